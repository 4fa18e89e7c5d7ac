//! Per-layer key/value tensors: what a forward pass computes and what a later
//! pass reads as its past. Plain tensors the caller owns, so the compressor can
//! pick positions out of them and the decoder can load them from a .sack.

use candle_core::{DType, Device, Tensor};

use crate::error::{InputError, Result};

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

    /// Every layer's K/V of `chunks` (`chunks[chunk][layer]`) joined along
    /// the sequence axis, in chunk order: one `LayerKv` per layer.
    pub fn concat_chunks(chunks: &[Vec<LayerKv>]) -> Result<Vec<LayerKv>> {
        let layers = chunks.first().map_or(0, Vec::len);
        (0..layers)
            .map(|layer| {
                let keys: Vec<&Tensor> = chunks.iter().map(|c| &c[layer].k).collect();
                let values: Vec<&Tensor> = chunks.iter().map(|c| &c[layer].v).collect();
                Ok(LayerKv {
                    k: Tensor::cat(&keys, 2)?,
                    v: Tensor::cat(&values, 2)?,
                })
            })
            .collect()
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

impl LayerKv {
    /// Each KV head at its own sequence offsets: head h's K/V at `heads[h]`
    /// in its first slots, zeros after, up to the longest set,
    /// `[1, kv_heads, longest, head_dim]`. A layer that keeps nothing is
    /// empty, and on the CPU (CUDA refuses empty allocations).
    pub fn gather_per_head(&self, heads: &[Vec<usize>]) -> Result<LayerKv> {
        let longest = heads.iter().map(Vec::len).max().unwrap_or(0);
        let gather = |t: &Tensor| -> Result<Tensor> {
            if longest == 0 {
                let (_, kv_heads, _, dim) = t.dims4()?;
                return Ok(Tensor::zeros(
                    (1, kv_heads, 0, dim),
                    t.dtype(),
                    &Device::Cpu,
                )?);
            }
            let parts = heads
                .iter()
                .enumerate()
                .map(|(h, offsets)| take(&t.narrow(1, h, 1)?, offsets, longest - offsets.len()))
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 1)?)
        };
        Ok(LayerKv {
            k: gather(&self.k)?,
            v: gather(&self.v)?,
        })
    }

    /// Head `h`'s first `n` slots, `[1, 1, n, head_dim]`: its own K/V in a
    /// layer [`LayerKv::gather_per_head`] made.
    pub fn head(&self, h: usize, n: usize) -> Result<LayerKv> {
        let own = |t: &Tensor| t.narrow(1, h, 1)?.narrow(2, 0, n);
        Ok(LayerKv {
            k: own(&self.k)?,
            v: own(&self.v)?,
        })
    }
}

/// `t` (`[1, 1, len, dim]`, one head) at `offsets` along the sequence, then
/// `pad` zero slots. One head at a time: a cache's views are not contiguous
/// across heads, which candle's index-select needs, and empty parts are
/// never handed to its cat.
fn take(t: &Tensor, offsets: &[usize], pad: usize) -> Result<Tensor> {
    let dim = t.dim(3)?;
    let zeros = || Tensor::zeros((1, 1, pad, dim), t.dtype(), t.device());
    if offsets.is_empty() {
        return Ok(zeros()?);
    }
    let offsets: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
    let own = t.index_select(&Tensor::new(offsets.as_slice(), t.device())?, 2)?;
    Ok(match pad {
        0 => own,
        _ => Tensor::cat(&[&own, &zeros()?], 2)?,
    })
}

/// One KV head's kept pairs, each row-major `[n, head_dim]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeadPairs {
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
}

impl SharedKv {
    /// A layer of `heads` laid out as [`LayerKv::gather_per_head`] does,
    /// in `dtype` on `device` (on the CPU when it keeps nothing); when the
    /// heads keep different positions (`ragged`), a `-inf` bias hides each
    /// head's padding.
    pub fn from_heads(
        heads: Vec<HeadPairs>,
        head_dim: usize,
        ragged: bool,
        device: &Device,
        dtype: DType,
    ) -> Result<SharedKv> {
        let kv_heads = heads.len();
        let longest = heads
            .iter()
            .map(|h| h.keys.len() / head_dim.max(1))
            .max()
            .unwrap_or(0);
        let device = if longest == 0 { &Device::Cpu } else { device };
        let mut keys = Vec::with_capacity(kv_heads * longest * head_dim);
        let mut values = Vec::with_capacity(keys.capacity());
        let mut bias = Vec::with_capacity(kv_heads * longest);
        for head in heads {
            let pad = longest - head.keys.len() / head_dim.max(1);
            let zeros = || std::iter::repeat_n(0.0, pad * head_dim);
            keys.extend(head.keys.into_iter().chain(zeros()));
            values.extend(head.values.into_iter().chain(zeros()));
            bias.extend(
                std::iter::repeat_n(0.0, longest - pad)
                    .chain(std::iter::repeat_n(f32::NEG_INFINITY, pad)),
            );
        }
        let shape = (1, kv_heads, longest, head_dim);
        let load = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
        };
        let bias = ragged
            .then(|| Tensor::from_vec(bias, (kv_heads, longest), device))
            .transpose()?;
        Ok(SharedKv {
            kv: LayerKv {
                k: load(keys)?,
                v: load(values)?,
            },
            bias,
        })
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
            return Err(InputError::RaggedLayers.into());
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
            return Err(InputError::Layers {
                what: "appended K/V",
                got: new.len(),
                model: self.buffers.len(),
            }
            .into());
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
        return Err(InputError::NotFourD(dims).into());
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

    #[test]
    fn ragged_heads_are_padded_and_hidden() -> Result<()> {
        // Two heads, four positions, head_dim 1: head h's value at p is 10h + p.
        let t = Tensor::from_slice(
            &[0f32, 1., 2., 3., 10., 11., 12., 13.],
            (1, 2, 4, 1),
            &Device::Cpu,
        )?;
        let layer = LayerKv { k: t.clone(), v: t };
        let gathered = layer.gather_per_head(&[vec![1, 3], vec![2]])?;
        let k: Vec<f32> = gathered.k.flatten_all()?.to_vec1()?;
        assert_eq!(k, [1., 3., 12., 0.]);
        let own: Vec<f32> = gathered.head(1, 1)?.v.flatten_all()?.to_vec1()?;
        assert_eq!(own, [12.]);
        let heads = vec![
            HeadPairs {
                keys: vec![1., 3.],
                values: vec![1., 3.],
            },
            HeadPairs {
                keys: vec![12.],
                values: vec![12.],
            },
        ];
        let shared = SharedKv::from_heads(heads, 1, true, &Device::Cpu, DType::F32)?;
        assert_eq!(shared.kv.k.flatten_all()?.to_vec1::<f32>()?, k);
        let bias: Vec<Vec<f32>> = shared.bias.unwrap().to_vec2()?;
        assert_eq!(bias, [[0., 0.], [0., f32::NEG_INFINITY]]);
        Ok(())
    }
}
