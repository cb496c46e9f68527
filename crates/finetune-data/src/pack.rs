//! Packing examples into sequences, and the order they are read in.
//!
//! Packing is first-fit-decreasing: examples sorted by length (longest first, ties by their
//! index, so the result is deterministic), each put in the first sequence with room, a new
//! sequence opened when none has. Within a sequence each document keeps its own position ids
//! (restarting at 0), which is also how the model finds document boundaries: no token attends
//! across them. The first label of every document is −100, so no token is ever predicted from
//! the previous document.
//!
//! Order: epoch e reads the sequences in a Fisher–Yates shuffle drawn from ChaCha8 seeded with
//! (seed, e); a [`Cursor`] (epoch, index) is the exact place to resume from.

use crate::render::Example;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

/// One packed training sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub position_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// Length of each document, in order.
    pub doc_lens: Vec<usize>,
}

impl Sequence {
    /// Tokens the loss is taken on (a label at t is predicted from position t − 1).
    pub fn target_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l >= 0).count()
    }
}

/// First-fit-decreasing packing of `examples` (each at most `seq_len` tokens) into sequences of
/// at most `seq_len` tokens.
pub fn pack(examples: &[Example], seq_len: usize) -> Vec<Sequence> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(examples[i].ids.len()), i));
    let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
    for i in order {
        let len = examples[i].ids.len();
        assert!(
            len <= seq_len,
            "example {i} of {len} tokens exceeds {seq_len}"
        );
        match bins.iter_mut().find(|(used, _)| used + len <= seq_len) {
            Some((used, members)) => {
                *used += len;
                members.push(i);
            }
            None => bins.push((len, vec![i])),
        }
    }
    bins.into_iter()
        .map(|(used, members)| {
            let mut s = Sequence {
                ids: Vec::with_capacity(used),
                position_ids: Vec::with_capacity(used),
                labels: Vec::with_capacity(used),
                doc_lens: Vec::with_capacity(members.len()),
            };
            for i in members {
                let e = &examples[i];
                s.ids.extend(&e.ids);
                s.position_ids.extend(0..e.ids.len() as u32);
                s.labels.push(-100);
                s.labels.extend(&e.labels[1..]);
                s.doc_lens.push(e.ids.len());
            }
            s
        })
        .collect()
}

/// Where reading stands: the next sequence is `order(epoch)[index]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub index: u64,
}

/// The read order of `n` sequences in `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    order
}

/// Deterministic, resumable reader over packed sequences.
pub struct Batches {
    n: usize,
    seed: u64,
    cursor: Cursor,
    order: Vec<usize>,
}

impl Batches {
    /// Starts at `cursor` (use `Cursor::default()` for a fresh run).
    pub fn new(n: usize, seed: u64, cursor: Cursor) -> Self {
        Self {
            n,
            seed,
            cursor,
            order: epoch_order(n, seed, cursor.epoch),
        }
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Index of the next sequence; wraps into a new epoch (and a new shuffle) at the end.
    pub fn next_index(&mut self) -> usize {
        assert!(self.n > 0, "no sequences to read");
        if self.cursor.index as usize >= self.n {
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                index: 0,
            };
            self.order = epoch_order(self.n, self.seed, self.cursor.epoch);
        }
        let i = self.order[self.cursor.index as usize];
        self.cursor.index += 1;
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(len: usize, tag: u32) -> Example {
        Example {
            ids: vec![tag; len],
            labels: (0..len)
                .map(|i| if i < len / 2 { -100 } else { tag as i64 })
                .collect(),
        }
    }

    #[test]
    fn first_fit_decreasing_fills_bins_and_keeps_documents_apart() {
        let lens = [7, 3, 5, 2, 6, 4, 1];
        let examples: Vec<Example> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| example(l, i as u32))
            .collect();
        let seqs = pack(&examples, 10);
        // FFD: 7+3, 6+4, 5+2+1 (sorted 7,6,5,4,3,2,1).
        let docs: Vec<Vec<usize>> = seqs.iter().map(|s| s.doc_lens.clone()).collect();
        assert_eq!(docs, vec![vec![7, 3], vec![6, 4], vec![5, 2, 1]]);
        for s in &seqs {
            assert!(s.ids.len() <= 10);
            let mut start = 0;
            for &len in &s.doc_lens {
                assert_eq!(
                    s.position_ids[start..start + len],
                    (0..len as u32).collect::<Vec<_>>()
                );
                assert_eq!(s.labels[start], -100, "no prediction across documents");
                start += len;
            }
        }
        // Every example's tokens are somewhere, once.
        let total: usize = seqs.iter().map(|s| s.ids.len()).sum();
        assert_eq!(total, lens.iter().sum::<usize>());
    }

    #[test]
    fn shuffle_is_seeded_and_the_cursor_resumes_exactly() {
        let mut a = Batches::new(10, 7, Cursor::default());
        let full: Vec<usize> = (0..25).map(|_| a.next_index()).collect();
        // Each epoch is a permutation, and epochs differ.
        let mut e0 = full[..10].to_vec();
        e0.sort();
        assert_eq!(e0, (0..10).collect::<Vec<_>>());
        assert_ne!(full[..10], full[10..20]);
        assert_ne!(full[..10], (0..10).collect::<Vec<_>>());
        let mut b = Batches::new(10, 7, Cursor::default());
        let first: Vec<usize> = (0..13).map(|_| b.next_index()).collect();
        let mut resumed = Batches::new(10, 7, b.cursor());
        let rest: Vec<usize> = (0..12).map(|_| resumed.next_index()).collect();
        assert_eq!([first, rest].concat(), full);
        assert_ne!(
            Batches::new(10, 8, Cursor::default()).next_index_seq(10),
            full[..10]
        );
    }

    impl Batches {
        fn next_index_seq(&mut self, n: usize) -> Vec<usize> {
            (0..n).map(|_| self.next_index()).collect()
        }
    }
}
