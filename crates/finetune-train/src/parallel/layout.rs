//! Parallel layouts: which rank holds which attention heads, which experts and which data.
//!
//! A layout of N ranks is (tp, ep) with tp | ep | N, as `finetune plan` assumes (MoE
//! parallel folding, Megatron-Core's name for it):
//! - attention is tensor parallel over `tp` ranks (query heads split in contiguous blocks,
//!   whole key/value groups per rank) and data parallel over the N/tp groups;
//! - experts are sharded over `ep` ranks — the tp ranks of a tensor-parallel group each hold a
//!   different slice of experts, and `ep/tp` such groups, holding different data, exchange
//!   tokens by all-to-all — and replicated over the `dp = N/ep` data-parallel copies.
//!
//! Ranks are numbered with tp fastest: rank = (d·a2a + a)·tp + t, with t < tp the tensor-parallel
//! index, a < a2a = ep/tp the index in the all-to-all group, d < dp the replica. Expert shard
//! s = a·tp + t holds experts [s·E/ep, (s+1)·E/ep). Data (sequences) is split over the N/tp
//! data ranks (d, a); the ranks of a tensor-parallel group read the same sequences.
//!
//! Groups a rank talks in: `tp` (same d, a: attention and MoE partial sums), `a2a` (same d, t:
//! token dispatch/combine), `dp` (same a, t: expert gradients), and the world.

use finetune_model::Qwen3MoeConfig;
use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub world: usize,
    pub tp: usize,
    pub ep: usize,
}

/// A rank's place in a [`Layout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coords {
    pub rank: usize,
    /// Tensor-parallel index.
    pub t: usize,
    /// Index in the all-to-all (expert-parallel data) group.
    pub a: usize,
    /// Data-parallel replica.
    pub d: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parallel layout world {world}, tp {tp}, ep {ep}: {message}")]
pub struct LayoutError {
    pub world: usize,
    pub tp: usize,
    pub ep: usize,
    pub message: String,
}

impl Layout {
    /// A layout of `world` ranks, checked against the model: tp must divide ep, ep must divide
    /// the world, the heads, key/value heads and experts must split evenly.
    pub fn new(
        world: usize,
        tp: usize,
        ep: usize,
        config: &Qwen3MoeConfig,
    ) -> Result<Self, LayoutError> {
        let l = Layout { world, tp, ep };
        let err = |message: String| LayoutError {
            world,
            tp,
            ep,
            message,
        };
        if world == 0 || tp == 0 || ep == 0 {
            return Err(err("world, tp and ep must be at least 1".into()));
        }
        if ep % tp != 0 {
            return Err(err(format!(
                "ep {ep} is not a multiple of tp {tp} (each tensor-parallel rank holds its own \
                 slice of the experts)"
            )));
        }
        if world % ep != 0 {
            return Err(err(format!(
                "ep {ep} does not divide the world size {world}"
            )));
        }
        let (nh, nkv) = (config.num_attention_heads, config.num_key_value_heads);
        if nkv % tp != 0 || nh % tp != 0 {
            return Err(err(format!(
                "tp {tp} does not divide the {nh} attention heads and {nkv} key/value heads"
            )));
        }
        if config.vocab_size < tp {
            return Err(err(format!(
                "the vocabulary of {} tokens is smaller than tp {tp} (each tensor-parallel rank \
                 holds a slice of the embedding and lm_head rows)",
                config.vocab_size
            )));
        }
        let experts = config.num_experts;
        let has_moe = (0..config.num_hidden_layers).any(|i| config.is_moe_layer(i));
        if has_moe && experts % ep != 0 {
            return Err(err(format!(
                "{experts} experts do not split evenly over ep {ep}"
            )));
        }
        Ok(l)
    }

    /// Ranks exchanging tokens by all-to-all (ep/tp).
    pub fn a2a(&self) -> usize {
        self.ep / self.tp
    }

    /// Data-parallel replicas of the experts (world/ep).
    pub fn dp(&self) -> usize {
        self.world / self.ep
    }

    /// Ranks reading different sequences (world/tp).
    pub fn data_ranks(&self) -> usize {
        self.world / self.tp
    }

    pub fn coords(&self, rank: usize) -> Coords {
        let t = rank % self.tp;
        let a = (rank / self.tp) % self.a2a();
        let d = rank / self.ep;
        Coords { rank, t, a, d }
    }

    pub fn rank_of(&self, t: usize, a: usize, d: usize) -> usize {
        (d * self.a2a() + a) * self.tp + t
    }

    /// Index of rank's data slice, in 0..data_ranks.
    pub fn data_index(&self, c: Coords) -> usize {
        c.d * self.a2a() + c.a
    }

    /// Expert shard of a rank.
    pub fn shard(&self, c: Coords) -> usize {
        c.a * self.tp + c.t
    }

    /// Experts held by shard `s` of `experts`.
    pub fn experts_of_shard(&self, s: usize, experts: usize) -> Range<usize> {
        let per = experts / self.ep;
        s * per..(s + 1) * per
    }

    /// Shard holding expert `e` of `experts`.
    pub fn shard_of_expert(&self, e: usize, experts: usize) -> usize {
        e / (experts / self.ep)
    }

    /// Query heads of tensor-parallel index t.
    pub fn heads(&self, t: usize, heads: usize) -> Range<usize> {
        let per = heads / self.tp;
        t * per..(t + 1) * per
    }

    /// The members of each group kind, as lists of global ranks (each list in group-rank
    /// order); a rank's group is the list that contains it.
    pub fn groups(&self, kind: GroupKind) -> Vec<Vec<usize>> {
        let (tp, a2a, dp) = (self.tp, self.a2a(), self.dp());
        let mut out = Vec::new();
        match kind {
            GroupKind::World => out.push((0..self.world).collect()),
            GroupKind::Tp => {
                for d in 0..dp {
                    for a in 0..a2a {
                        out.push((0..tp).map(|t| self.rank_of(t, a, d)).collect());
                    }
                }
            }
            GroupKind::A2a => {
                for d in 0..dp {
                    for t in 0..tp {
                        out.push((0..a2a).map(|a| self.rank_of(t, a, d)).collect());
                    }
                }
            }
            GroupKind::Dp => {
                for a in 0..a2a {
                    for t in 0..tp {
                        out.push((0..dp).map(|d| self.rank_of(t, a, d)).collect());
                    }
                }
            }
        }
        out
    }
}

/// The communicators of a parallel run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    World,
    Tp,
    A2a,
    Dp,
}

pub const GROUP_KINDS: [GroupKind; 4] = [
    GroupKind::World,
    GroupKind::Tp,
    GroupKind::A2a,
    GroupKind::Dp,
];

/// Expert index of an adapter name `model.layers.{L}.mlp.experts.{E}.{proj}`.
pub fn expert_of(name: &str) -> Option<usize> {
    let rest = name.split(".mlp.experts.").nth(1)?;
    rest.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use finetune_model::Preset;

    #[test]
    fn coordinates_groups_and_shards() {
        let mut c = Preset::Tiny.config();
        c.num_experts = 8;
        let l = Layout::new(8, 2, 4, &c).unwrap();
        assert_eq!((l.a2a(), l.dp(), l.data_ranks()), (2, 2, 4));
        for r in 0..8 {
            let k = l.coords(r);
            assert_eq!(l.rank_of(k.t, k.a, k.d), r);
        }
        assert_eq!(
            l.coords(5),
            Coords {
                rank: 5,
                t: 1,
                a: 0,
                d: 1
            }
        );
        assert_eq!(
            l.groups(GroupKind::Tp),
            vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]
        );
        assert_eq!(
            l.groups(GroupKind::A2a),
            vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]
        );
        assert_eq!(
            l.groups(GroupKind::Dp),
            vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]
        );
        // Every expert lives on exactly one shard; shards 0..ep cover them in order.
        assert_eq!(l.experts_of_shard(l.shard(l.coords(3)), 8), 6..8);
        assert_eq!(l.shard_of_expert(5, 8), 2);
        assert_eq!(l.heads(1, 4), 2..4);
        assert_eq!(expert_of("model.layers.3.mlp.experts.12.up_proj"), Some(12));
        assert_eq!(expert_of("model.layers.3.self_attn.q_proj"), None);
    }

    #[test]
    fn impossible_layouts_name_the_numbers() {
        let mut c = Preset::Tiny.config();
        c.num_experts = 160;
        let e = Layout::new(3, 1, 3, &c).unwrap_err().to_string();
        assert!(e.contains("160 experts") && e.contains("ep 3"), "{e}");
        let e = Layout::new(4, 2, 1, &c).unwrap_err().to_string();
        assert!(e.contains("not a multiple of tp 2"), "{e}");
        let e = Layout::new(6, 1, 4, &c).unwrap_err().to_string();
        assert!(e.contains("does not divide the world size 6"), "{e}");
        let e = Layout::new(8, 8, 8, &c).unwrap_err().to_string();
        assert!(e.contains("key/value heads"), "{e}");
        let mut c = Preset::Tiny.config();
        c.vocab_size = 1;
        let e = Layout::new(2, 2, 2, &c).unwrap_err().to_string();
        assert!(
            e.contains("vocabulary of 1 tokens") && e.contains("tp 2"),
            "{e}"
        );
    }
}
