//! From importance scores to kept positions: one budget for the whole model,
//! shared across layers and KV heads, so a head the model leans on keeps
//! more than one it ignores (KVzip's non-uniform head budget, `_threshold`
//! in snu-mllab/KVzip `attention/score.py`, `compress_post` in kvpress's
//! `KVzipPress`).

use std::cmp::Ordering;
use std::ops::Range;

use crate::error::{Error, Result};

/// One score per (layer, KV head, position) of a context; higher is more
/// important.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    layers: usize,
    heads: usize,
    len: usize,
    /// `[layer][head][position]`, row-major.
    values: Vec<f32>,
}

impl Scores {
    /// All zero.
    pub fn new(layers: usize, heads: usize, len: usize) -> Self {
        Scores {
            layers,
            heads,
            len,
            values: vec![0.0; layers * heads * len],
        }
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    pub fn heads(&self) -> usize {
        self.heads
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, layer: usize, head: usize, position: usize) -> f32 {
        self.values[self.index(layer, head, position)]
    }

    /// Sets the scores of `layer`, head by head, at positions `start..` from
    /// `rows` (`[heads][n]`).
    pub fn set(&mut self, layer: usize, start: usize, rows: &[Vec<f32>]) {
        for (head, row) in rows.iter().enumerate() {
            let at = self.index(layer, head, start);
            self.values[at..at + row.len()].copy_from_slice(row);
        }
    }

    fn index(&self, layer: usize, head: usize, position: usize) -> usize {
        (layer * self.heads + head) * self.len + position
    }
}

/// K/V pairs kept of `layers x heads x len` at `ratio`: ceil(total / ratio).
pub fn budget(layers: usize, heads: usize, len: usize, ratio: usize) -> usize {
    (layers * heads * len).div_ceil(ratio)
}

/// Kept positions per layer, per KV head, ascending: the `forced` positions
/// for every head, then, while the `budget` lasts, the highest
/// scores among the other (layer, head, position) triples. Forced positions
/// count against the budget but are kept even when they exceed it, so no
/// head is ever left without keys.
///
/// Equal scores are broken by position (earlier first), then layer, then
/// head, so the choice is deterministic.
pub fn top_k(scores: &Scores, forced: Range<usize>, budget: usize) -> Result<Vec<Vec<Vec<usize>>>> {
    let (layers, heads, len) = (scores.layers, scores.heads, scores.len);
    let forced = forced.start.min(len)..forced.end.min(len);
    let is_forced = |p: usize| forced.contains(&p);
    let rest = budget.saturating_sub(forced.len() * layers * heads);
    if u32::try_from(scores.values.len()).is_err() {
        return Err(Error::InvalidInput(format!(
            "{layers} layers x {heads} KV heads x {len} tokens are too many scores to rank"
        )));
    }
    // Candidates as flat indices into `values`: u32 halves the memory of a
    // long document's ranking.
    let mut candidates: Vec<u32> = (0..scores.values.len() as u32)
        .filter(|&i| !is_forced(i as usize % len))
        .collect();
    let order = |a: &u32, b: &u32| -> Ordering {
        let (a, b) = (*a as usize, *b as usize);
        scores.values[b]
            .total_cmp(&scores.values[a])
            .then((a % len).cmp(&(b % len)))
            .then((a / len).cmp(&(b / len)))
    };
    if rest < candidates.len() {
        if rest > 0 {
            candidates.select_nth_unstable_by(rest - 1, order);
        }
        candidates.truncate(rest);
    }
    let mut kept =
        vec![vec![(0..len).filter(|&p| is_forced(p)).collect::<Vec<_>>(); heads]; layers];
    for i in candidates {
        let i = i as usize;
        let (slot, position) = (i / len, i % len);
        kept[slot / heads][slot % heads].push(position);
    }
    for set in kept.iter_mut().flatten() {
        set.sort_unstable();
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(values: &[[&[f32]; 2]]) -> Scores {
        let len = values[0][0].len();
        let mut s = Scores::new(values.len(), 2, len);
        for (layer, rows) in values.iter().enumerate() {
            let rows: Vec<Vec<f32>> = rows.iter().map(|r| r.to_vec()).collect();
            s.set(layer, 0, &rows);
        }
        s
    }

    #[test]
    fn budget_is_shared_across_layers_and_heads() {
        let s = scores(&[
            [&[0.9, 0.1, 0.8, 0.2], &[0.0, 0.0, 0.0, 0.0]],
            [&[0.5, 0.6, 0.0, 0.0], &[0.7, 0.0, 0.0, 0.0]],
        ]);
        assert_eq!(budget(2, 2, 4, 3), 6);
        let kept = top_k(&s, 0..0, 4).unwrap();
        assert_eq!(kept[0], vec![vec![0, 2], vec![]]);
        assert_eq!(kept[1], vec![vec![1], vec![0]]);
        // Layer 1 head 0 position 0 (0.5) is the fifth.
        assert_eq!(top_k(&s, 0..0, 5).unwrap()[1][0], vec![0, 1]);
    }

    #[test]
    fn forced_positions_count_and_are_never_dropped() {
        let s = scores(&[[&[0.0, 0.9, 0.8, 0.7], &[0.0, 0.1, 0.2, 0.3]]]);
        // 2 heads x 1 forced = 2 of the budget of 3: one more pair.
        let kept = top_k(&s, 0..1, 3).unwrap();
        assert_eq!(kept[0], vec![vec![0, 1], vec![0]]);
        // A budget below the forced pairs keeps the forced pairs only.
        let kept = top_k(&s, 2..4, 1).unwrap();
        assert_eq!(kept[0], vec![vec![2, 3], vec![2, 3]]);
    }

    #[test]
    fn ties_go_to_earlier_positions_then_lower_layers_and_heads() {
        let s = scores(&[[&[0.5, 0.5], &[0.5, 0.5]], [&[0.5, 0.5], &[0.5, 0.5]]]);
        let kept = top_k(&s, 0..0, 3).unwrap();
        assert_eq!(kept[0], vec![vec![0], vec![0]]);
        assert_eq!(kept[1], vec![vec![0], vec![]]);
        let kept = top_k(&s, 0..0, 8).unwrap();
        assert!(kept.iter().flatten().all(|h| h == &[0, 1]));
    }
}
