//! Per-layer key/value tensors: what a forward pass computes and what a later
//! pass reads as its past. Plain tensors the caller owns, so the compressor can
//! pick positions out of them and the decoder can load them from a .sack.

use candle_core::Tensor;

use crate::error::{Error, Result};

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

    /// The positions at `indices` (a u32 tensor) along the sequence axis.
    pub fn select(&self, indices: &Tensor) -> Result<LayerKv> {
        Ok(LayerKv {
            k: self.k.index_select(indices, 2)?,
            v: self.v.index_select(indices, 2)?,
        })
    }
}

/// One layer's K/V that every row of a batch reads (a loaded document),
/// `[1, kv_heads, len, head_dim]`, visible to every query.
#[derive(Debug, Clone)]
pub struct SharedKv {
    pub kv: LayerKv,
    /// An additive `[kv_heads, len]` term on the attention scores: `-inf`
    /// hides a slot, so heads that keep fewer positions than others can pad.
    pub bias: Option<Tensor>,
}

impl From<LayerKv> for SharedKv {
    fn from(kv: LayerKv) -> Self {
        SharedKv { kv, bias: None }
    }
}

/// A cache for incremental decoding. Each layer's K/V live in a buffer with
/// room to grow; appending writes in place, and the past handed to a forward
/// pass is a view, so a decoding step costs no copy of the (possibly long)
/// past. Questions share one loaded context through [`SharedKv`], not by
/// rewinding a cache.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    buffers: Vec<LayerKv>,
    len: usize,
}

impl KvCache {
    /// A cache holding `layers`, with room for `extra` more positions before
    /// it has to grow.
    pub fn new(layers: Vec<LayerKv>, extra: usize) -> Result<Self> {
        let len = layers.first().map_or(0, LayerKv::len);
        if layers
            .iter()
            .any(|l| l.len() != len || l.v.dims().get(2) != Some(&len))
        {
            return Err(Error::InvalidInput(
                "K/V layers hold different lengths".into(),
            ));
        }
        let buffers = layers
            .iter()
            .map(|l| {
                Ok(LayerKv {
                    k: with_room(&l.k, extra)?,
                    v: with_room(&l.v, extra)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(KvCache { buffers, len })
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Views of every layer's K/V so far, to pass as a forward pass's past;
    /// `None` while the cache is empty.
    pub fn past(&self) -> Result<Option<Vec<LayerKv>>> {
        if self.len == 0 {
            return Ok(None);
        }
        self.buffers
            .iter()
            .map(|b| {
                Ok(LayerKv {
                    k: b.k.narrow(2, 0, self.len)?,
                    v: b.v.narrow(2, 0, self.len)?,
                })
            })
            .collect::<Result<_>>()
            .map(Some)
    }

    /// Appends one forward pass's new K/V (one entry per layer).
    pub fn append(&mut self, new: &[LayerKv]) -> Result<()> {
        let Some(added) = new.first().map(LayerKv::len) else {
            return Ok(());
        };
        if self.buffers.is_empty() {
            *self = KvCache::new(new.to_vec(), added.max(16))?;
            return Ok(());
        }
        if new.len() != self.buffers.len() {
            return Err(Error::InvalidInput(format!(
                "appending {} layers to a cache of {}",
                new.len(),
                self.buffers.len()
            )));
        }
        let capacity = self.buffers[0].len();
        if self.len + added > capacity {
            let room = (self.len + added).max(2 * capacity) - capacity;
            for b in &mut self.buffers {
                b.k = with_room(&b.k, room)?;
                b.v = with_room(&b.v, room)?;
            }
        }
        for (b, n) in self.buffers.iter().zip(new) {
            b.k.slice_set(&n.k.contiguous()?, 2, self.len)?;
            b.v.slice_set(&n.v.contiguous()?, 2, self.len)?;
        }
        self.len += added;
        Ok(())
    }

    /// Keeps only the batch rows at `rows` (a u32 tensor), in that order.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for b in &mut self.buffers {
            b.k = b.k.index_select(rows, 0)?;
            b.v = b.v.index_select(rows, 0)?;
        }
        Ok(())
    }
}

/// A contiguous copy of `t` with `extra` zeroed positions after its own.
fn with_room(t: &Tensor, extra: usize) -> Result<Tensor> {
    let mut dims = t.dims().to_vec();
    let Some(seq) = dims.get_mut(2) else {
        return Err(Error::InvalidInput(format!(
            "K/V tensor of shape {dims:?} is not 4-D"
        )));
    };
    *seq = extra;
    let room = Tensor::zeros(dims, t.dtype(), t.device())?;
    Ok(Tensor::cat(&[t, &room], 2)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn kv(values: &[f32]) -> LayerKv {
        let t = Tensor::from_slice(values, (1, 1, values.len(), 1), &Device::Cpu).unwrap();
        LayerKv {
            k: t.clone(),
            v: (t * 10.0).unwrap(),
        }
    }

    fn keys(cache: &KvCache) -> Vec<f32> {
        let past = cache.past().unwrap().unwrap();
        past[0].k.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn append_grows_past_its_room() -> Result<()> {
        let mut cache = KvCache::new(vec![kv(&[1.0, 2.0])], 1)?;
        cache.append(&[kv(&[3.0])])?;
        cache.append(&[kv(&[4.0, 5.0])])?;
        assert_eq!(keys(&cache), [1.0, 2.0, 3.0, 4.0, 5.0]);
        let v: Vec<f32> = cache.past()?.unwrap()[0].v.flatten_all()?.to_vec1()?;
        assert_eq!(v, [10.0, 20.0, 30.0, 40.0, 50.0]);
        Ok(())
    }

    #[test]
    fn select_rows_keeps_rows_in_order() -> Result<()> {
        let rows = Tensor::from_slice(&[1f32, 2.0, 3.0], (3, 1, 1, 1), &Device::Cpu)?;
        let mut cache = KvCache::new(
            vec![LayerKv {
                k: rows.clone(),
                v: rows,
            }],
            1,
        )?;
        cache.select_rows(&Tensor::new(&[2u32, 0], &Device::Cpu)?)?;
        assert_eq!(keys(&cache), [3.0, 1.0]);
        Ok(())
    }

    #[test]
    fn empty_cache_has_no_past() -> Result<()> {
        let mut cache = KvCache::default();
        assert!(cache.past()?.is_none());
        cache.append(&[kv(&[7.0])])?;
        assert_eq!(keys(&cache), [7.0]);
        Ok(())
    }
}
