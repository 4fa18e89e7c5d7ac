//! From importance scores to kept positions: one budget for the whole model,
//! shared across layers and KV heads, so a head the model leans on keeps
//! more than one it ignores (KVzip's non-uniform head budget, `_threshold`
//! in snu-mllab/KVzip `attention/score.py`, `compress_post` in kvpress's
//! `KVzipPress`).

use std::cmp::Ordering;
use std::ops::Range;

use crate::error::{InputError, Result};

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

/// How a selector's budget is spread over layers and KV heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadBudget {
    /// One pool for the whole model: the best (layer, head, position)
    /// triples win wherever they are (KVzip's non-uniform head budget).
    Shared,
    /// Every layer and KV head keeps the same number of its own best
    /// positions (kvpress's `ScorerPress`, as `SnapKVPress` runs).
    Even,
}

/// Kept positions per layer, per KV head, ascending: the positions `forced`
/// holds, for every head, then, while the `budget` lasts, the highest scores among
/// the other positions, spread as `spread` says. Forced positions count
/// against the budget but are kept even when they exceed it, so no head is
/// ever left without keys.
///
/// Equal scores are broken by position (earlier first), then layer, then
/// head, so the choice is deterministic.
pub fn top_k(
    scores: &Scores,
    forced: &dyn Fn(usize) -> bool,
    budget: usize,
    spread: HeadBudget,
) -> Result<Vec<Vec<Vec<usize>>>> {
    let (layers, heads, len) = (scores.layers, scores.heads, scores.len);
    let forced_positions: Vec<usize> = (0..len).filter(|&p| forced(p)).collect();
    if u32::try_from(scores.values.len()).is_err() {
        return Err(InputError::TooManyScores { layers, heads, len }.into());
    }
    let order = |a: &u32, b: &u32| -> Ordering {
        let (a, b) = (*a as usize, *b as usize);
        scores.values[b]
            .total_cmp(&scores.values[a])
            .then((a % len).cmp(&(b % len)))
            .then((a / len).cmp(&(b / len)))
    };
    // Candidates as flat indices into `values`: u32 halves the memory of a
    // long document's ranking.
    let best = |slots: Range<usize>, keep: usize| -> Vec<u32> {
        let mut candidates: Vec<u32> = (slots.start * len..slots.end * len)
            .map(|i| i as u32)
            .filter(|&i| !forced(i as usize % len))
            .collect();
        if keep < candidates.len() {
            if keep > 0 {
                candidates.select_nth_unstable_by(keep - 1, order);
            }
            candidates.truncate(keep);
        }
        candidates
    };
    let chosen = match spread {
        HeadBudget::Shared => best(
            0..layers * heads,
            budget.saturating_sub(forced_positions.len() * layers * heads),
        ),
        HeadBudget::Even => {
            let each = budget
                .div_ceil((layers * heads).max(1))
                .saturating_sub(forced_positions.len());
            (0..layers * heads)
                .flat_map(|slot| best(slot..slot + 1, each))
                .collect()
        }
    };
    let mut kept = vec![vec![forced_positions; heads]; layers];
    for i in chosen {
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
        let kept = top_k(&s, &|_| false, 4, HeadBudget::Shared).unwrap();
        assert_eq!(kept[0], vec![vec![0, 2], vec![]]);
        assert_eq!(kept[1], vec![vec![1], vec![0]]);
        // Layer 1 head 0 position 0 (0.5) is the fifth.
        assert_eq!(
            top_k(&s, &|_| false, 5, HeadBudget::Shared).unwrap()[1][0],
            vec![0, 1]
        );
    }

    #[test]
    fn forced_positions_count_and_are_never_dropped() {
        let s = scores(&[[&[0.0, 0.9, 0.8, 0.7], &[0.0, 0.1, 0.2, 0.3]]]);
        // 2 heads x 1 forced = 2 of the budget of 3: one more pair.
        let kept = top_k(&s, &|p| p < 1, 3, HeadBudget::Shared).unwrap();
        assert_eq!(kept[0], vec![vec![0, 1], vec![0]]);
        // A budget below the forced pairs keeps the forced pairs only.
        let kept = top_k(&s, &|p| (2..4).contains(&p), 1, HeadBudget::Shared).unwrap();
        assert_eq!(kept[0], vec![vec![2, 3], vec![2, 3]]);
    }

    #[test]
    fn ties_go_to_earlier_positions_then_lower_layers_and_heads() {
        let s = scores(&[[&[0.5, 0.5], &[0.5, 0.5]], [&[0.5, 0.5], &[0.5, 0.5]]]);
        let kept = top_k(&s, &|_| false, 3, HeadBudget::Shared).unwrap();
        assert_eq!(kept[0], vec![vec![0], vec![0]]);
        assert_eq!(kept[1], vec![vec![0], vec![]]);
        let kept = top_k(&s, &|_| false, 8, HeadBudget::Shared).unwrap();
        assert!(kept.iter().flatten().all(|h| h == &[0, 1]));
    }

    #[test]
    fn an_even_budget_gives_every_head_the_same_count() {
        let s = scores(&[
            [&[0.9, 0.1, 0.8, 0.2], &[0.0, 0.0, 0.0, 0.3]],
            [&[0.5, 0.6, 0.0, 0.0], &[0.7, 0.0, 0.0, 0.0]],
        ]);
        // 8 pairs over 4 heads: 2 each, the forced first position one of them.
        let kept = top_k(&s, &|p| p < 1, 8, HeadBudget::Even).unwrap();
        assert_eq!(kept[0], vec![vec![0, 2], vec![0, 3]]);
        assert_eq!(kept[1], vec![vec![0, 1], vec![0, 1]]);
        // Two forced ranges, both kept by every head.
        let kept = top_k(&s, &|p| p == 0 || p == 3, 4, HeadBudget::Even).unwrap();
        assert!(kept.iter().flatten().all(|h| h == &[0, 3]));
    }
}
