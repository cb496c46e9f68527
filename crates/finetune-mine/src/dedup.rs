//! Duplicate removal: exact duplicates by hash, near-duplicates by MinHash + LSH.
//!
//! Each document is the set of its word 5-grams (shingles). MinHash with `NUM_HASHES`
//! functions estimates the Jaccard similarity J(A, B) = |A∩B| / |A∪B| as the fraction of equal
//! signature entries. LSH splits the signature into `BANDS` bands of `ROWS` rows: two documents
//! become candidates when any band is equal, which happens with probability
//! 1 − (1 − J^ROWS)^BANDS (≈ 0.5 at J = (1/BANDS)^(1/ROWS) = 0.71 for 16 × 8). Candidates are
//! kept as duplicates only when the signature estimate is ≥ the threshold. The earlier
//! document (in the order given) is kept.

use std::collections::{HashMap, HashSet};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

pub const SHINGLE_WORDS: usize = 5;
pub const BANDS: usize = 16;
pub const ROWS: usize = 8;
pub const NUM_HASHES: usize = BANDS * ROWS;

/// Why a document was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicate {
    Exact,
    Near,
}

/// MinHash signature of a text's word shingles.
pub fn signature(text: &str) -> [u64; NUM_HASHES] {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut sig = [u64::MAX; NUM_HASHES];
    let mut add = |h: u64| {
        // NUM_HASHES hash functions from one 64-bit hash: h_i = xxh3(h, seed i) would cost a
        // hash per function; a multiply-xorshift per function is as good for MinHash.
        for (i, s) in sig.iter_mut().enumerate() {
            let mut x = h ^ SEEDS[i];
            x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            x ^= x >> 29;
            x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x ^= x >> 32;
            if x < *s {
                *s = x;
            }
        }
    };
    if words.len() < SHINGLE_WORDS {
        add(xxh3_64(words.join(" ").as_bytes()));
    } else {
        for w in words.windows(SHINGLE_WORDS) {
            let mut h = 0u64;
            for word in w {
                h = xxh3_64_with_seed(word.as_bytes(), h);
            }
            add(h);
        }
    }
    sig
}

const SEEDS: [u64; NUM_HASHES] = {
    let mut s = [0u64; NUM_HASHES];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut i = 0;
    while i < NUM_HASHES {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        s[i] = z ^ (z >> 31);
        i += 1;
    }
    s
};

/// Estimated Jaccard similarity of two signatures.
pub fn similarity(a: &[u64; NUM_HASHES], b: &[u64; NUM_HASHES]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / NUM_HASHES as f64
}

/// Exact-duplicate key: the text with each line's surrounding whitespace removed.
pub fn exact_key(text: &str) -> u64 {
    let mut h = 0u64;
    for line in text.lines() {
        h = xxh3_64_with_seed(line.trim().as_bytes(), h);
    }
    h
}

/// Finds duplicates among documents, in order; earlier documents win.
pub struct Deduper {
    threshold: f64,
    exact: HashSet<u64>,
    bands: Vec<HashMap<u64, Vec<usize>>>,
    signatures: Vec<[u64; NUM_HASHES]>,
}

impl Deduper {
    /// `threshold`: Jaccard similarity at or above which a document is a near-duplicate;
    /// values above 1 turn near-duplicate detection off.
    pub fn new(threshold: f64) -> Self {
        Self {
            threshold,
            exact: HashSet::new(),
            bands: vec![HashMap::new(); BANDS],
            signatures: Vec::new(),
        }
    }

    /// Checks `text` against everything kept so far; keeps it when it is new.
    pub fn check(&mut self, text: &str) -> Option<Duplicate> {
        if !self.exact.insert(exact_key(text)) {
            return Some(Duplicate::Exact);
        }
        if self.threshold > 1.0 {
            return None;
        }
        let sig = signature(text);
        let keys: Vec<u64> = (0..BANDS)
            .map(|b| {
                let band = &sig[b * ROWS..(b + 1) * ROWS];
                let bytes: Vec<u8> = band.iter().flat_map(|x| x.to_le_bytes()).collect();
                xxh3_64(&bytes)
            })
            .collect();
        let mut seen = HashSet::new();
        for (b, key) in keys.iter().enumerate() {
            if let Some(ids) = self.bands[b].get(key) {
                for &id in ids {
                    if seen.insert(id) && similarity(&sig, &self.signatures[id]) >= self.threshold {
                        return Some(Duplicate::Near);
                    }
                }
            }
        }
        let id = self.signatures.len();
        self.signatures.push(sig);
        for (b, key) in keys.into_iter().enumerate() {
            self.bands[b].entry(key).or_default().push(id);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(n: usize, salt: &str) -> String {
        (0..n).map(|i| format!("w{i}{salt} ")).collect()
    }

    #[test]
    fn exact_duplicates_ignore_indentation() {
        let mut d = Deduper::new(0.7);
        assert_eq!(d.check("fn a() {\n    x\n}\n"), None);
        assert_eq!(d.check("fn a() {\n  x\n}"), Some(Duplicate::Exact));
    }

    #[test]
    fn near_duplicates_above_the_threshold_are_dropped() {
        let base = words(400, "");
        // 8 of 400 words changed: each touches 5 shingles, so 356 of 396 shingles are shared
        // and the union has 436: J ≈ 0.82.
        let near: String = base
            .split_whitespace()
            .enumerate()
            .map(|(i, w)| {
                if i % 50 == 0 {
                    format!("{w}x ")
                } else {
                    format!("{w} ")
                }
            })
            .collect();
        let other = words(400, "y");
        let mut d = Deduper::new(0.7);
        assert_eq!(d.check(&base), None);
        assert_eq!(d.check(&near), Some(Duplicate::Near));
        assert_eq!(d.check(&other), None);
    }

    #[test]
    fn signature_estimates_jaccard() {
        // Two texts sharing half of their shingles: J = 1/3 (|A∩B| = n, |A∪B| = 3n).
        let a = words(1000, "");
        let b: String = words(500, "").to_string() + &words(500, "z");
        let s = similarity(&signature(&a), &signature(&b));
        // Shared: the first 496 5-grams of 996 in a; union ≈ 996 + 500 → J ≈ 0.33.
        assert!((s - 0.33).abs() < 0.12, "estimate {s}");
    }

    #[test]
    fn threshold_above_one_keeps_near_duplicates() {
        let mut d = Deduper::new(1.01);
        let base = words(100, "");
        assert_eq!(d.check(&base), None);
        assert_eq!(d.check(&(base.clone() + "extra")), None);
    }
}
