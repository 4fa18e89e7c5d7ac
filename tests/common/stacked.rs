//! A .sack layer whose heads share their kept positions, stacked into the
//! `[kv_heads, n, head_dim]` shape attention kernels take.

use sac::sack::StoredLayer;

#[derive(Clone, Debug, PartialEq)]
pub struct StackedKv {
    /// Kept positions shared by every head.
    pub positions: Vec<u32>,
    /// Keys, row-major `[kv_heads, n, head_dim]`.
    pub keys: Vec<f32>,
    /// Values, row-major `[kv_heads, n, head_dim]`.
    pub values: Vec<f32>,
}

/// `layer`'s heads stacked, if they share their positions; the layer back
/// otherwise.
pub fn stacked(layer: StoredLayer) -> Result<StackedKv, StoredLayer> {
    let shared = layer
        .heads
        .split_first()
        .is_none_or(|(first, rest)| rest.iter().all(|h| h.positions == first.positions));
    if !shared {
        return Err(layer);
    }
    let positions = layer
        .heads
        .first()
        .map(|h| h.positions.clone())
        .unwrap_or_default();
    let (keys, values) = layer
        .heads
        .into_iter()
        .map(|h| (h.keys, h.values))
        .unzip::<_, _, Vec<_>, Vec<_>>();
    Ok(StackedKv {
        positions,
        keys: keys.concat(),
        values: values.concat(),
    })
}
