//! Tokens to chunks, and the anchor positions inside each chunk (docs/method.md,
//! "Compressing a document"). Chunks are compressed independently; positions are global and 1-based.

/// The reference's chunk length.
pub const DEFAULT_CHUNK_SIZE: usize = 510;
/// The reference's main compression ratio (102 anchors per full chunk).
pub const DEFAULT_RATIO: usize = 5;

/// One chunk of the context: ids `start..start + len` (0-based indices), at
/// position ids `start + 1 ..= start + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub index: usize,
    pub start: usize,
    pub len: usize,
}

impl Chunk {
    /// The 1-based position id of the chunk's first token.
    pub fn first_position(&self) -> u32 {
        super::position(self.start)
    }

    /// Position ids of every token in the chunk.
    pub fn positions(&self) -> Vec<u32> {
        (0..self.len as u32)
            .map(|i| self.first_position() + i)
            .collect()
    }
}

/// Splits `total` tokens into chunks of `chunk_size` (the last may be shorter).
pub fn chunks(total: usize, chunk_size: usize) -> impl Iterator<Item = Chunk> {
    assert!(chunk_size > 0, "chunk size must be positive");
    (0..total.div_ceil(chunk_size)).map(move |index| {
        let start = index * chunk_size;
        Chunk {
            index,
            start,
            len: chunk_size.min(total - start),
        }
    })
}

/// The 0-based offset of a chunk's first anchor at `ratio`: the middle of
/// its first `ratio` tokens (the earlier middle for an even ratio).
fn first_anchor_offset(ratio: usize) -> usize {
    (ratio - 1) / 2
}

/// 0-based offsets of the anchors inside a chunk of `len` tokens at `ratio`:
/// the first at [`first_anchor_offset`], then every `ratio`-th; a chunk too
/// short to reach the first anchor keeps its first token instead.
pub fn anchor_offsets(len: usize, ratio: usize) -> Vec<usize> {
    assert!(ratio > 0, "ratio must be positive");
    let first = first_anchor_offset(ratio);
    let first = if first >= len { 0 } else { first };
    (first..len).step_by(ratio).collect()
}

/// 0-based offsets `uniform` keeps in a chunk of `len` tokens at `ratio`
/// when the chunk, encoded without its predecessors, keeps its own first
/// `sinks` tokens (its attention sinks): ceil(len / ratio) in all, the sinks
/// and then the middles of equal stretches of the rest. No sinks gives the
/// anchors ([`anchor_offsets`]), the reference's uniform ablation.
pub fn uniform_offsets(len: usize, ratio: usize, sinks: usize) -> Vec<usize> {
    if sinks == 0 {
        return anchor_offsets(len, ratio);
    }
    let kept = len.div_ceil(ratio);
    let sinks = sinks.min(kept);
    let (spread, rest) = (kept - sinks, len - sinks);
    (0..sinks)
        .chain((0..spread).map(|i| sinks + (2 * i + 1) * rest / (2 * spread)))
        .collect()
}

/// Anchors in a full chunk, i.e. how many role embeddings an adapter needs.
pub fn mem_size(chunk_size: usize, ratio: usize) -> usize {
    chunk_size.div_ceil(ratio)
}

/// For each anchor of a full chunk at `ratio`, the index of the anchor at
/// `from_ratio` nearest to it in the chunk (the earlier of two as near, the
/// last anchor past the end): which role embedding of an adapter trained at
/// `from_ratio` seeds each of one at `ratio`.
pub fn nearest_anchors(chunk_size: usize, from_ratio: usize, ratio: usize) -> Vec<usize> {
    let from_first = first_anchor_offset(from_ratio);
    let last = anchor_offsets(chunk_size, from_ratio).len() - 1;
    // Steps of `from_ratio` past its first anchor, rounded half down.
    let half_down = (from_ratio - 1) / 2;
    (0..mem_size(chunk_size, ratio))
        .map(|j| {
            let offset = first_anchor_offset(ratio) + j * ratio;
            let past_first = offset.saturating_sub(from_first);
            ((past_first + half_down) / from_ratio).min(last)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_context_once() {
        let all: Vec<Chunk> = chunks(1022, 510).collect();
        assert_eq!(all.len(), 3);
        assert_eq!((all[2].start, all[2].len), (1020, 2));
        assert_eq!(all[1].first_position(), 511);
        assert_eq!(all[2].positions(), vec![1021, 1022]);
        assert_eq!(chunks(0, 510).count(), 0);
    }

    #[test]
    fn anchors_at_ratio_5_match_the_reference() {
        let full = anchor_offsets(510, 5);
        assert_eq!(full.len(), 102);
        assert_eq!(&full[..3], &[2, 7, 12]);
        assert_eq!(*full.last().unwrap(), 507);
        assert_eq!(mem_size(510, 5), 102);
        assert_eq!(mem_size(510, 15), 34);
    }

    #[test]
    fn short_last_chunk_keeps_its_first_token() {
        assert_eq!(anchor_offsets(2, 5), vec![0]);
        assert_eq!(anchor_offsets(3, 5), vec![2]);
        assert_eq!(anchor_offsets(1, 1), vec![0]);
        assert_eq!(anchor_offsets(7, 1), (0..7).collect::<Vec<_>>());
    }

    #[test]
    fn nearest_anchors_are_nearest() {
        assert_eq!(
            nearest_anchors(510, 4, 8),
            (0..64).map(|j| 2 * j).collect::<Vec<_>>()
        );
        assert_eq!(nearest_anchors(510, 5, 5), (0..102).collect::<Vec<_>>());
        for chunk_size in [64, 510] {
            for from_ratio in 1..12 {
                let from = anchor_offsets(chunk_size, from_ratio);
                for ratio in 1..12 {
                    let to = anchor_offsets(chunk_size, ratio);
                    let picked = nearest_anchors(chunk_size, from_ratio, ratio);
                    assert_eq!(picked.len(), mem_size(chunk_size, ratio));
                    for (&offset, &i) in to.iter().zip(&picked) {
                        let best = from.iter().map(|f| f.abs_diff(offset)).min().unwrap();
                        let first_best = from.iter().position(|f| f.abs_diff(offset) == best);
                        assert_eq!(Some(i), first_best, "{from_ratio} -> {ratio} at {offset}");
                    }
                }
            }
        }
    }

    #[test]
    fn anchors_never_exceed_mem_size() {
        for ratio in 1..20 {
            for len in 1..=64 {
                let n = anchor_offsets(len, ratio).len();
                assert!(
                    n >= 1 && n <= mem_size(64, ratio),
                    "len {len} ratio {ratio}"
                );
            }
        }
    }

    #[test]
    fn uniform_keeps_the_sinks_then_spreads_the_rest() {
        assert_eq!(uniform_offsets(20, 4, 2), [0, 1, 5, 11, 17]);
        assert_eq!(uniform_offsets(510, 5, 0), anchor_offsets(510, 5));
        for (len, ratio) in [(510, 2), (510, 16), (7, 3), (3, 16), (1, 1), (9, 1)] {
            let kept = uniform_offsets(len, ratio, 4);
            assert_eq!(kept.len(), len.div_ceil(ratio), "{len} {ratio}");
            assert_eq!(kept[0], 0);
            assert!(kept.windows(2).all(|w| w[0] < w[1]), "{kept:?}");
            assert!(kept.last().is_some_and(|&o| o < len));
        }
    }
}
