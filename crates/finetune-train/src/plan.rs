//! The memory planner behind `finetune plan`: per-GPU memory of LoRA training for a model ×
//! GPU count × recipe, the parallel layout chosen, and the largest micro-batch that fits.
//!
//! Layout (MoE parallel folding, as Megatron-Core does it): attention, embedding and lm_head are
//! sharded over `tp` ranks (heads; vocabulary) and replicated over the other N/tp; dense MLPs
//! (`mlp_only_layers`) are whole on every rank, as `parallel` runs and loads them;
//! experts are sharded over `ep` ranks and replicated over N/ep; `tp` and `ep` divide the GPU
//! count N and both groups span the same GPUs (8×H100: tp 8 for attention, ep 8 for experts).
//! Replicas are data parallel.
//!
//! Per GPU, in bytes (T = micro_batch × seq_len tokens):
//! - base weights: projections at 2 bytes (bf16) or 1 + 4/128² (FP8 E4M3 + one f32 scale per
//!   128×128 block); router, norms, embedding and lm_head always bf16 (FP8 checkpoints keep
//!   them so). Attention/vocabulary parameters / tp (k and v over min(tp, kv heads)), dense
//!   MLPs whole, experts × E/ep: the bytes each rank's sharded load holds
//!   (`parallel::load_rank_model`; tested against it in tests/shard_load.rs).
//! - LoRA: r·(in + out) per adapted projection, 18 bytes each: f32 master (4), f32 gradient
//!   (4), Adam m and v (8), bf16 compute copy (2). Attention (and dense-MLP) adapters whole on
//!   every rank, as the parallel trainer keeps them; expert adapters × E/ep.
//! - activations, `a` = 2 bytes per element: bf16, the compute dtype of a GPU run on one GPU
//!   and of every rank on several (`parallel` ranks compute in the model's compute dtype);
//!   the fused kernels of the GPU issue (flash attention
//!   without T² scores, cross-entropy chunked over 4,096 vocabulary entries): per token and MoE
//!   layer 2h + 2(n_h·d + n_kv·d)/tp + k(h + 3·m) elements (norm inputs, q/k/v and attention
//!   output, per routed expert its input, gate, up and activation) plus E router logits in f32,
//!   dense layers h + 3·i in place of the expert term; all layers kept, or with recompute each
//!   layer's input (h) plus one layer's; plus T × 4,096 × 4 bytes of logits chunk.
//! - communication: all-to-all dispatch + combine 2·T·k·h·a bytes when ep > 1, a T·h·a buffer
//!   for tensor-parallel all-reduce when tp > 1.
//! - workspace: 3 GiB (CUDA context, cuBLAS/cuBLASLt workspaces, NCCL, allocator slack) —
//!   an assumption, not a measurement.

use finetune_model::Qwen3MoeConfig;

pub const GIB: f64 = (1u64 << 30) as f64;
pub const WORKSPACE_BYTES: f64 = 3.0 * GIB;
pub const LOGITS_CHUNK: f64 = 4096.0;
pub const LORA_BYTES_PER_PARAM: f64 = 18.0;

/// How the base projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Bf16,
    Fp8Block128,
}

impl WeightFormat {
    pub fn bytes_per_param(self) -> f64 {
        match self {
            WeightFormat::Bf16 => 2.0,
            WeightFormat::Fp8Block128 => 1.0 + 4.0 / (128.0 * 128.0),
        }
    }
}

/// What is planned.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub config: Qwen3MoeConfig,
    pub gpus: usize,
    /// Memory of one GPU, bytes.
    pub gpu_mem: f64,
    pub weights: WeightFormat,
    pub r: usize,
    /// Module kinds with LoRA (`q_proj`, …, `down_proj`).
    pub targets: Vec<String>,
    pub seq_len: usize,
    pub micro_batch: usize,
}

impl PlanInput {
    /// Bytes per activation element: 2, bf16 — the compute dtype on GPUs, on one GPU and on
    /// every rank of several (the parallel engine computes in the model's compute dtype).
    pub fn activation_bytes(&self) -> f64 {
        2.0
    }
}

/// Per-GPU memory of one layout, bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub tp: usize,
    pub ep: usize,
    pub recompute: bool,
    pub weights: f64,
    pub lora: f64,
    pub lora_params: f64,
    pub activations: f64,
    pub communication: f64,
    pub workspace: f64,
    /// Tokens per micro-batch these figures are for.
    pub tokens: usize,
    /// Bytes per additional token (activations + communication).
    pub per_token: f64,
}

impl Budget {
    pub fn total(&self) -> f64 {
        self.weights + self.lora + self.activations + self.communication + self.workspace
    }

    /// Most tokens per micro-batch within `mem` bytes (0 when even the fixed part does not fit).
    pub fn max_tokens(&self, mem: f64) -> usize {
        let fixed = self.weights + self.lora + self.workspace;
        if fixed >= mem {
            return 0;
        }
        ((mem - fixed) / self.per_token).floor() as usize
    }
}

fn targeted(input: &PlanInput, module: &str) -> bool {
    input.targets.iter().any(|t| t == module)
}

/// The budget of layout (tp, ep) with or without recompute for the input's micro-batch.
pub fn budget(input: &PlanInput, tp: usize, ep: usize, recompute: bool) -> Budget {
    let c = &input.config;
    let (h, d) = (c.hidden_size as f64, c.head_dim() as f64);
    let (nh, nkv) = (c.num_attention_heads as f64, c.num_key_value_heads as f64);
    let (e, k, mi) = (
        c.num_experts as f64,
        c.num_experts_per_tok as f64,
        c.moe_intermediate_size as f64,
    );
    let inter = c.intermediate_size as f64;
    let v = c.vocab_size as f64;
    let r = input.r as f64;
    let tpf = tp as f64;
    let kv_shards = (tp.min(c.num_key_value_heads)) as f64;
    let proj = input.weights.bytes_per_param();
    let tokens = (input.micro_batch * input.seq_len) as f64;
    // Bytes per activation element: bf16, on one GPU or several.
    let act = input.activation_bytes();

    let (mut weights, mut lora_params, mut act_all, mut act_max) = (0.0, 0.0, 0.0, 0.0f64);
    for layer in 0..c.num_hidden_layers {
        // Attention: q and o over tp, k and v over min(tp, kv heads); norms replicated.
        let (q, kv, o) = (h * nh * d / tpf, h * nkv * d / kv_shards, nh * d * h / tpf);
        weights += (q + 2.0 * kv + o) * proj + (2.0 * h + 2.0 * d) * 2.0;
        for (m, inp, out) in [
            ("q_proj", h, nh * d),
            ("k_proj", h, nkv * d),
            ("v_proj", h, nkv * d),
            ("o_proj", nh * d, h),
        ] {
            // Kept whole on every rank (each computes its heads' share of the gradient and
            // the world sums them), whatever the base's sharding.
            if targeted(input, m) {
                lora_params += r * (inp + out);
            }
        }
        let attn_act = 2.0 * h + 2.0 * (nh * d + nkv * d) / tpf;
        let layer_act = if c.is_moe_layer(layer) {
            let local = e / ep as f64;
            weights += local * 3.0 * h * mi * proj + e * h * 2.0;
            for m in ["gate_proj", "up_proj", "down_proj"] {
                if targeted(input, m) {
                    lora_params += local * r * (h + mi);
                }
            }
            (attn_act + k * (h + 3.0 * mi)) * act + e * 4.0
        } else {
            // Dense MLPs run whole on every tensor-parallel rank (weights, adapters, activations).
            weights += 3.0 * h * inter * proj;
            for m in ["gate_proj", "up_proj", "down_proj"] {
                if targeted(input, m) {
                    lora_params += r * (h + inter);
                }
            }
            (attn_act + h + 3.0 * inter) * act
        };
        act_all += layer_act;
        act_max = act_max.max(layer_act);
    }
    // Embedding and lm_head, vocabulary-parallel, bf16; final norm.
    let heads = if c.tie_word_embeddings { 1.0 } else { 2.0 };
    weights += heads * v * h / tpf * 2.0 + h * 2.0;

    let per_layer_tokens = if recompute {
        c.num_hidden_layers as f64 * h * act + act_max
    } else {
        act_all
    };
    let logits = LOGITS_CHUNK * 4.0;
    let comm = if ep > 1 { 2.0 * k * h * act } else { 0.0 } + if tp > 1 { h * act } else { 0.0 };
    let per_token = per_layer_tokens + logits + comm;
    Budget {
        tp,
        ep,
        recompute,
        weights,
        lora: lora_params * LORA_BYTES_PER_PARAM,
        lora_params,
        activations: tokens * (per_layer_tokens + logits),
        communication: tokens * comm,
        workspace: WORKSPACE_BYTES,
        tokens: tokens as usize,
        per_token,
    }
}

/// Every layout the model allows on `input.gpus` GPUs, with and without recompute, best
/// first: those that fit the input's micro-batch, without recompute before with (it costs a
/// second forward), then the most tokens per micro-batch, then the least parallelism.
pub fn layouts(input: &PlanInput) -> Vec<Budget> {
    let n = input.gpus.max(1);
    let c = &input.config;
    let divisors: Vec<usize> = (1..=n).filter(|d| n % d == 0).collect();
    let mut out = Vec::new();
    // The layouts `parallel::Layout` implements: tp divides the query and the key/value heads
    // (whole key/value groups per rank) and the expert-parallel degree (each tp rank holds its
    // own slice of the experts).
    for &tp in divisors
        .iter()
        .filter(|&&t| c.num_attention_heads % t == 0 && c.num_key_value_heads % t == 0)
    {
        for &ep in divisors
            .iter()
            .filter(|&&e| (c.num_experts == 0 || c.num_experts % e == 0) && e % tp == 0)
        {
            for recompute in [false, true] {
                out.push(budget(input, tp, ep, recompute));
            }
        }
    }
    let mem = input.gpu_mem;
    out.sort_by(|a, b| {
        let fits = |x: &Budget| x.total() <= mem;
        fits(b)
            .cmp(&fits(a))
            .then(a.recompute.cmp(&b.recompute))
            .then(b.max_tokens(mem).cmp(&a.max_tokens(mem)))
            .then((a.tp * a.ep).cmp(&(b.tp * b.ep)))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use finetune_model::Preset;

    fn all_targets() -> Vec<String> {
        [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .map(String::from)
        .to_vec()
    }

    /// Qwen3-Coder-30B-A3B (h 2048, 48 layers, 32 heads / 4 kv of 128, 128 experts of 768, top 8,
    /// vocabulary 151,936), bf16, r = 16 on attention + experts, 1 GPU, 1 × 4,096 tokens. By hand:
    /// - weights: per layer attention 2048·4096 + 2·2048·512 + 4096·2048 = 18,874,368, norms
    ///   2·2048 + 2·128 = 4,352, experts 128·3·2048·768 = 603,979,776, router 128·2048 = 262,144
    ///   → 623,120,640 × 48 = 29,909,790,720; + embedding and lm_head 2·151,936·2048 =
    ///   622,329,856 + final norm 2,048 = 30,532,122,624 parameters × 2 bytes = 61,064,245,248.
    /// - LoRA: per layer q 16·(2048+4096) = 98,304, k = v = 16·(2048+512) = 40,960, o 98,304,
    ///   experts 128·3·16·(2048+768) = 17,301,504 → 17,580,032 × 48 = 843,841,536 parameters
    ///   × 18 bytes = 15,189,147,648.
    /// - activations per token and layer: 2·2048 + 2·(4096+512) + 2·128 + 8·(2048 + 3·768) =
    ///   48,384 elements = 96,768 bytes; × 48 = 4,644,864; + logits chunk 16,384 → 4,661,248
    ///   bytes per token × 4,096 = 19,092,471,808. With recompute: 48·2048·2 + 96,768 + 16,384 =
    ///   309,760 bytes per token × 4,096 = 1,268,776,960.
    /// - workspace 3 GiB = 3,221,225,472; no communication on one GPU.
    ///
    /// Totals: 98,567,090,176 bytes (91.8 GiB, does not fit 80 GiB) and, with recompute,
    /// 80,743,395,328 bytes (75.2 GiB, fits).
    #[test]
    fn the_30b_preset_matches_the_hand_calculation() {
        let input = PlanInput {
            config: Preset::Qwen3Coder30bA3b.config(),
            gpus: 1,
            gpu_mem: 80.0 * GIB,
            weights: WeightFormat::Bf16,
            r: 16,
            targets: all_targets(),
            seq_len: 4096,
            micro_batch: 1,
        };
        let plain = budget(&input, 1, 1, false);
        assert_eq!(plain.weights, 61_064_245_248.0);
        assert_eq!(plain.lora_params, 843_841_536.0);
        assert_eq!(plain.lora, 15_189_147_648.0);
        assert_eq!(plain.activations, 19_092_471_808.0);
        assert_eq!(plain.communication, 0.0);
        assert_eq!(plain.total(), 98_567_090_176.0);
        let re = budget(&input, 1, 1, true);
        assert_eq!(re.activations, 1_268_776_960.0);
        assert_eq!(re.total(), 80_743_395_328.0);
        let best = &layouts(&input)[0];
        assert!(best.recompute && best.total() <= input.gpu_mem, "{best:?}");
        // Largest micro-batch: (80 GiB − fixed) / 309,760 bytes per token.
        let fixed = 61_064_245_248.0 + 15_189_147_648.0 + 3_221_225_472.0;
        assert_eq!(
            best.max_tokens(input.gpu_mem),
            ((80.0 * GIB - fixed) / 309_760.0).floor() as usize
        );
    }

    /// The seed's question: Qwen3-Coder-480B-A35B-FP8, r = 16 on attention + all experts, 8 GPUs,
    /// 1 × 4,096 tokens, activations in bf16 (the ranks' compute dtype). By hand, at tp 8 × ep 8
    /// (h 6144, 62 layers, 96 heads / 8 kv of 128, 160 experts of 2560, top 8):
    /// - activations per token and layer: 2·6144 + 2·(12288 + 1024)/8 + 8·(6144 + 3·2560) =
    ///   126,208 elements × 2 bytes + 160 router logits × 4 = 253,056 bytes; × 62 = 15,689,472;
    ///   plus the logits chunk, 16,384: 15,705,856 bytes per token × 4,096 = 64,331,186,176 (59.9 GiB).
    ///   With recompute: 62·6144·2 + 253,056 + 16,384 = 1,031,296 per token × 4,096 =
    ///   4,224,188,416 (3.9 GiB).
    /// - communication: all-to-all 2·8·6144·2 + tp all-reduce 6144·2 = 208,896 bytes per token
    ///   × 4,096 = 855,638,016.
    #[test]
    fn the_480b_fp8_fits_8_h100_only_sharded_and_8_h200_comfortably() {
        let input = |mem_gib: f64| PlanInput {
            config: Preset::Qwen3Coder480bA35b.config(),
            gpus: 8,
            gpu_mem: mem_gib * GIB,
            weights: WeightFormat::Fp8Block128,
            r: 16,
            targets: all_targets(),
            seq_len: 4096,
            micro_batch: 1,
        };
        // Activations in bf16 on several GPUs, as on one.
        assert_eq!(input(80.0).activation_bytes(), 2.0);
        let plain = budget(&input(80.0), 8, 8, false);
        assert_eq!(plain.activations, 64_331_186_176.0);
        assert_eq!(plain.communication, 855_638_016.0);
        let re = budget(&input(80.0), 8, 8, true);
        assert_eq!(re.activations, 4_224_188_416.0);
        assert_eq!(re.per_token, 1_031_296.0 + 208_896.0);
        let h100 = layouts(&input(80.0));
        // Every layout the planner offers is one the trainer runs.
        for b in &h100 {
            crate::parallel::Layout::new(8, b.tp, b.ep, &input(80.0).config)
                .unwrap_or_else(|e| panic!("planned layout tp {} ep {}: {e}", b.tp, b.ep));
        }
        let best = &h100[0];
        assert!(best.total() <= 80.0 * GIB, "{best:?}");
        assert_eq!((best.tp, best.ep), (8, 8), "{best:?}");
        // Experts on one GPU each (ep 1) can never fit: ~470 GB of FP8 experts.
        assert!(budget(&input(80.0), 8, 1, true).total() > 80.0 * GIB);
        // 80 GiB needs per-layer recompute (without: 129.5 GiB); 140 GiB fits without it now
        // that the ranks compute in bf16, with more than the 4,096 tokens asked for.
        assert!(best.recompute, "{best:?}");
        assert!(plain.total() > 80.0 * GIB && plain.total() <= 140.0 * GIB);
        let h200 = &layouts(&input(140.0))[0];
        assert!(!h200.recompute && h200.total() <= 140.0 * GIB, "{h200:?}");
        assert_eq!((h200.tp, h200.ep), (8, 8), "{h200:?}");
        assert!(h200.max_tokens(140.0 * GIB) >= 4096, "{h200:?}");
        // With recompute on 8×H200 the micro-batch could be about 6× the H100's.
        assert!(re.max_tokens(140.0 * GIB) > 6 * best.max_tokens(80.0 * GIB));
        // Attention adapters are whole on every rank (as the trainer keeps them), experts' × 1/8:
        // 62 layers × 16 × [(6144 + 12288) + 2·(6144 + 1024) + (12288 + 6144)
        //                   + 20 experts × 3 × (6144 + 2560)].
        let per_layer = 16.0 * (2.0 * 18432.0 + 2.0 * 7168.0 + 20.0 * 3.0 * 8704.0);
        assert_eq!(best.lora_params, 62.0 * per_layer);
    }
}
