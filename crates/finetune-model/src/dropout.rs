//! Counter-based LoRA dropout masks.
//!
//! Whether element (row, feature) of a module's adapter input is kept is a hash of
//! (seed, module name, the row's token key, the feature's index in the module's whole input),
//! not a draw from a random stream. So the same token gets the same mask on every path that
//! computes it: per-expert, batched or grouped experts (rows in any order, padded or not),
//! activation recompute (the replayed layer hashes the same keys; nothing to rewind), a resumed
//! run, and every parallel layout — a tensor-parallel rank holding columns `c..c+k` of o_proj's
//! input hashes features `c..c+k`, a data-parallel rank's sequences keep their place in the
//! step, and rows that reach an expert-parallel rank through the all-to-all bring their keys.
//! Parallel runs with dropout therefore compute exactly the single-device step (tested in
//! finetune-train's `tests/parallel.rs`), which a stream cannot give: its draws depend on the
//! order in which a device happens to visit the rows.
//!
//! Keys: a token's key is [`token_key`]`(sequence, position)`, where the trainer numbers the
//! sequences of a run (`step × batch + place in the step's batch`), so every step draws fresh
//! masks. A module's key is the 64-bit FNV-1a hash of its name (experts' names carry their
//! index). An element is kept when the top 32 bits of
//! `mix(mix(mix(seed ⊕ module) ⊕ token) + feature · φ)` fall below `(1 − p) · 2³²`, where `mix` is
//! SplitMix64's finalizer (a bijection of u64 with full avalanche) and φ = 0x9E3779B97F4A7C15;
//! kept elements are scaled by 1/(1 − p) as torch.nn.Dropout does. The masks' law is PEFT's
//! (independent Bernoulli(1 − p) per element); the draws themselves are not torch's.

/// SplitMix64's finalizer: a bijection of u64 whose every output bit depends on every input bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The key of token `position` of sequence `sequence` (unique per pair in practice: the
/// sequence's hash, a bijection, with the position added).
pub fn token_key(sequence: u64, position: u32) -> u64 {
    mix(sequence.wrapping_mul(GOLDEN) ^ 0xD40_0001).wrapping_add(u64::from(position))
}

/// The key of a module: FNV-1a (64-bit) of its name.
pub fn module_key(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Which tokens the rows of an adapter input are.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    /// Row i is token i of sequence `sequence` (a layer's own rows).
    Sequence(u64),
    /// Row i is token `tokens[i]` of sequence `sequence` (rows gathered for experts; a padding
    /// row may name any token: its input is zero).
    Tokens { sequence: u64, tokens: &'a [u32] },
    /// Row i's token key is given (rows received from other ranks).
    Keys(&'a [u64]),
}

impl Rows<'_> {
    /// The token key of row `i`.
    pub fn key(&self, i: usize) -> u64 {
        match self {
            Rows::Sequence(s) => token_key(*s, i as u32),
            Rows::Tokens { sequence, tokens } => token_key(*sequence, tokens[i]),
            Rows::Keys(k) => k[i],
        }
    }

    /// The rows `tokens` of these rows (row i of the result is row `tokens[i]` here).
    pub fn keys_of(&self, tokens: &[u32]) -> Vec<u64> {
        tokens.iter().map(|&t| self.key(t as usize)).collect()
    }
}

/// The factor by which each element of a `[rows, features]` input is multiplied: 0 (dropped) or
/// 1/(1 − p) (kept). Row i belongs to module `module_of(i)` (a key from [`module_key`]: stacked
/// experts' rows belong to different modules) and is token `rows.key(i)`; column j is feature
/// `first_feature + j` of the module's whole input.
pub fn mask(
    seed: u64,
    p: f64,
    rows: usize,
    features: usize,
    first_feature: usize,
    module_of: impl Fn(usize) -> u64,
    keys: &Rows<'_>,
) -> Vec<f32> {
    let keep = 1.0 - p;
    // Kept when the hash's top 32 bits are below keep · 2³² (exact for p = 0).
    let threshold = (keep * 4_294_967_296.0).round() as u64;
    let scale = (1.0 / keep) as f32;
    let mut out = Vec::with_capacity(rows * features);
    let mut last_module = None;
    let mut module_seed = 0;
    for i in 0..rows {
        let module = module_of(i);
        if last_module != Some(module) {
            module_seed = mix(seed ^ module);
            last_module = Some(module);
        }
        let row = mix(module_seed ^ keys.key(i));
        out.extend((0..features).map(|j| {
            let h = mix(row.wrapping_add(((first_feature + j) as u64).wrapping_mul(GOLDEN)));
            if (h >> 32) < threshold {
                scale
            } else {
                0.0
            }
        }));
    }
    out
}

/// Token keys as f32 values, four 16-bit pieces per key (exact in f32), so that they travel
/// through the f32 all-to-all with their rows: `[n, 4]` row-major.
pub fn keys_to_f32(keys: &[u64]) -> Vec<f32> {
    keys.iter()
        .flat_map(|&k| (0..4).map(move |i| ((k >> (16 * i)) & 0xFFFF) as f32))
        .collect()
}

/// The inverse of [`keys_to_f32`].
pub fn keys_from_f32(values: &[f32]) -> Vec<u64> {
    values
        .chunks_exact(4)
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u64, |k, (i, &v)| k | ((v as u64) << (16 * i)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(seed: u64, p: f64, n: usize, f: usize, rows: &Rows<'_>) -> Vec<f32> {
        mask(seed, p, n, f, 0, |_| module_key("m"), rows)
    }

    #[test]
    fn the_kept_fraction_is_one_minus_p_and_kept_values_are_scaled() {
        for p in [0.05, 0.1, 0.5] {
            let m = plain(7, p, 500, 400, &Rows::Sequence(3));
            let kept = m.iter().filter(|&&v| v != 0.0).count() as f64 / m.len() as f64;
            // 200,000 Bernoulli draws: the standard deviation of the fraction is ≤ 0.0012.
            assert!((kept - (1.0 - p)).abs() < 0.006, "p {p}: kept {kept}");
            let scale = (1.0 / (1.0 - p)) as f32;
            assert!(m.iter().all(|&v| v == 0.0 || v == scale));
            // Rows and columns are not correlated: each row and each column keeps about 1 − p.
            let row0 = m[..400].iter().filter(|&&v| v != 0.0).count() as f64 / 400.0;
            assert!((row0 - (1.0 - p)).abs() < 0.1, "p {p}: row 0 keeps {row0}");
        }
        assert!(plain(7, 0.0, 10, 10, &Rows::Sequence(3))
            .iter()
            .all(|&v| v == 1.0));
    }

    #[test]
    fn an_element_depends_only_on_its_token_module_and_feature() {
        let all = plain(1, 0.3, 6, 8, &Rows::Sequence(9));
        // Gathered rows in any order, padded: the same rows as in the sequence.
        let tokens = [4u32, 1, 4, 0];
        let g = plain(
            1,
            0.3,
            4,
            8,
            &Rows::Tokens {
                sequence: 9,
                tokens: &tokens,
            },
        );
        for (i, &t) in tokens.iter().enumerate() {
            assert_eq!(g[i * 8..i * 8 + 8], all[t as usize * 8..t as usize * 8 + 8]);
        }
        // Explicit keys (rows received from another rank) give the same.
        let keys = Rows::Sequence(9).keys_of(&tokens);
        let k = plain(1, 0.3, 4, 8, &Rows::Keys(&keys));
        assert_eq!(k, g);
        // A column slice (a tensor-parallel rank's features 3..7) is the slice of the mask.
        let cols = mask(1, 0.3, 6, 4, 3, |_| module_key("m"), &Rows::Sequence(9));
        for i in 0..6 {
            assert_eq!(cols[i * 4..i * 4 + 4], all[i * 8 + 3..i * 8 + 7]);
        }
        // Rows of several modules (stacked experts): each row as its module alone gives it.
        let two = mask(
            1,
            0.3,
            6,
            8,
            0,
            |i| module_key(if i < 2 { "m" } else { "n" }),
            &Rows::Sequence(9),
        );
        let n = mask(1, 0.3, 6, 8, 0, |_| module_key("n"), &Rows::Sequence(9));
        assert_eq!(two[..16], all[..16]);
        assert_eq!(two[16..], n[16..]);
        // Another module, sequence or seed draws another mask.
        assert_ne!(n, all);
        assert_ne!(plain(1, 0.3, 6, 8, &Rows::Sequence(10)), all);
        assert_ne!(plain(2, 0.3, 6, 8, &Rows::Sequence(9)), all);
    }

    #[test]
    fn keys_survive_the_trip_through_f32() {
        let keys = [0u64, 1, u64::MAX, token_key(5, 77), 0x8000_0000_0000_0001];
        let f = keys_to_f32(&keys);
        assert_eq!(f.len(), 20);
        assert_eq!(keys_from_f32(&f), keys);
    }

    #[test]
    fn token_keys_differ_across_sequences_and_positions() {
        let mut seen = std::collections::HashSet::new();
        for s in 0..64 {
            for t in 0..512 {
                assert!(seen.insert(token_key(s, t)), "sequence {s} token {t}");
            }
        }
    }
}
