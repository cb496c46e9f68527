//! The Qwen3-MoE forward pass in candle ops (f32); RMSNorm, RoPE and the head's loss
//! ([`Qwen3Moe::head_loss_sum`]) go through finetune-kernels' fused ops, whose CPU references
//! are tested against the plain formulas written here before; on the CPU so do the attention,
//! the SwiGLU activation and each projection with its LoRA adapter (`lora_linear`, without
//! dropout), the plain formulas below remaining the GPU path.
//!
//! Per layer, as in transformers' `Qwen3MoeDecoderLayer`:
//!   h = x + o_proj(attn(rope(q_norm(q_proj(n1(x)))), rope(k_norm(k_proj(n1(x)))), v_proj(n1(x))))
//!   y = h + mlp(n2(h))
//! with RMSNorm n(x) = x / sqrt(mean(x²) + eps) · w, causal grouped-query attention restricted to
//! the token's own document (a document starts where `position_ids` restarts at 0), RoPE
//! (x·cos + rotate_half(x)·sin, rotate_half(x) = [−x₂, x₁]) at the given positions, and an MLP
//! that is either dense SwiGLU, down(silu(gate(x)) ⊙ up(x)), or a mixture of experts: router
//! p = softmax(gate(x)), the top-k experts per token weighted by p (renormalised to sum to 1
//! when `norm_topk_prob`), each expert a SwiGLU.
//!
//! Compute dtype ([`Qwen3Moe::set_compute_dtype`]): f32 (the default, and the CPU's), or bf16
//! (a GPU's; on the CPU for tests), following transformers' bf16 path: activations, frozen projections
//! and residuals in bf16; RMSNorm statistics, the attention softmax, the router softmax and the
//! loss in f32; the LoRA path in f32 (as PEFT with f32 adapters: x cast to f32, s·(x·Aᵀ)·Bᵀ cast
//! back before the add), so LoRA gradients arrive in f32 for the f32 master weights.

use crate::config::Qwen3MoeConfig;
use crate::dropout::Rows;
use crate::lora::Lora;
use crate::shard::{BaseShard, Cut};
use crate::weights::{BaseWeight, Weights, WeightsError};
use candle_core::{DType, Device, Tensor, Var, D};
use finetune_kernels::moe_permute::{gather_rows, slot_weights, sum_rows, Permutation};

type Result<T> = std::result::Result<T, WeightsError>;

/// A frozen projection and the module name LoRA adapters are keyed by
/// (e.g. `model.layers.0.self_attn.q_proj`, `model.layers.0.mlp.experts.3.down_proj`).
pub(crate) struct Proj {
    pub name: String,
    pub w: BaseWeight,
}

struct Attention {
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    q_norm: Tensor,
    k_norm: Tensor,
}

struct Expert {
    gate: Proj,
    up: Proj,
    down: Proj,
}

enum Mlp {
    Dense(Expert),
    Moe {
        router: BaseWeight,
        experts: Vec<Expert>,
        /// The same expert weights stacked `[E, out, in]` per projection (each expert's `Proj`
        /// holds a view of its slice, so nothing is stored twice), for [`MoePath::Batched`].
        stacked: StackedExperts,
    },
}

struct StackedExperts {
    gate: BaseWeight,
    up: BaseWeight,
    down: BaseWeight,
}

/// How a MoE block runs its experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoePath {
    /// One forward per expert on its own tokens (the reference; the CPU default).
    PerExpert,
    /// Every expert's tokens gathered into one `[E, C, hidden]` tensor padded to the largest
    /// group C, each projection one batched GEMM (frozen base) plus batched LoRA matmuls, and
    /// one scatter-add back (the GPU default). Same math; LoRA dropout masks are drawn over
    /// the padded tensor, so with dropout the random stream differs from the per-expert path.
    Batched,
    /// Every expert's tokens gathered into one `[T·k, hidden]` tensor sorted by expert, no
    /// padding, each projection one GEMM per expert on exactly its rows
    /// (finetune_kernels::grouped_linear, for the frozen base and for the stacked LoRA A and B),
    /// and one scatter-add back (the GPU default). Same math as the per-expert path; dropout
    /// masks are drawn over the sorted rows, so the random stream differs from it.
    Grouped,
    /// [`MoePath::Grouped`]'s routing and math with the routed experts of a layer as ONE
    /// autograd node whose backward is written out by hand (`finetune_kernels::moe_experts`):
    /// it keeps g and u (and three `[rows, r]` LoRA products) for the backward instead of every
    /// intermediate, and hands x, the routing weights and the six stacked adapters their
    /// gradients once each. With LoRA dropout active (its masks are drawn per use) the layer
    /// runs the grouped path. A separate path rather than a flag: it is chosen the same way
    /// (`set_moe_path`, `--moe grouped-manual`) and compared with `Grouped` side by side;
    /// opt-in on the GPU (`FINETUNE_MOE_PATH=grouped-manual` or the bench flag) until a GPU
    /// session has measured it.
    GroupedManual,
}

impl MoePath {
    /// The path named as on the command line (`per-expert`, `batched`, `grouped`,
    /// `grouped-manual`).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "per-expert" => Self::PerExpert,
            "batched" => Self::Batched,
            "grouped" => Self::Grouped,
            "grouped-manual" => Self::GroupedManual,
            _ => return None,
        })
    }
}

/// How a decoder layer runs its attention half (input norm to residual add).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    /// A chain of autograd ops (the fused norm, projection, RoPE and attention ops; the
    /// default): candle keeps each op's inputs and outputs until the backward.
    Chain,
    /// The same math as ONE autograd node whose backward is written out by hand
    /// (`finetune_kernels::attention_block`): it keeps q and k before their norms, v, the
    /// attention output and its logsumexps and the `[T, r]` LoRA products, and recomputes the
    /// norms and RoPE in the backward. Applies where the chain has nothing the node lacks:
    /// whole layers without a KV cache, frozen norms and projections, LoRA dropout off, the
    /// fused attention op in use, no FP8 tensor-core GEMM on q/k/v/o; elsewhere the layer runs
    /// the chain. Opt-in (`FINETUNE_ATTENTION_BLOCK=manual`, `--attention-block manual` on
    /// `finetune bench train`) until a GPU session has measured it.
    Manual,
}

impl AttentionPath {
    /// The path named as on the command line (`chain`, `manual`).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "chain" => Self::Chain,
            "manual" => Self::Manual,
            _ => return None,
        })
    }
}

/// The attention path a model starts with: `FINETUNE_ATTENTION_BLOCK` (an
/// [`AttentionPath::from_name`] name) when set, else the chain.
fn default_attention_path() -> AttentionPath {
    let named = std::env::var("FINETUNE_ATTENTION_BLOCK").ok();
    match named.as_deref().map(|n| (n, AttentionPath::from_name(n))) {
        Some((_, Some(path))) => path,
        Some((n, None)) => {
            eprintln!("FINETUNE_ATTENTION_BLOCK={n}: not one of chain, manual; ignored");
            AttentionPath::Chain
        }
        None => AttentionPath::Chain,
    }
}

struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    attn: Attention,
    mlp: Mlp,
}

/// Keys and values of the tokens seen so far, per layer (`[kv heads, tokens, head_dim]`).
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The attention mask and RoPE tables of one forward, shared by its layers.
pub struct SequenceContext {
    t: usize,
    past: usize,
    /// Index of the first token of each token's document (the fused attention's mask).
    doc_start: Vec<u32>,
    /// The additive `[1, T, past + T]` mask of the plain attention path, built on first use
    /// (the fused path never needs it: at T = 4,096 it is 64 MB and a dozen launches).
    mask: std::sync::OnceLock<Tensor>,
    /// The fused attention's documents (on a GPU also in device memory), made on first use and
    /// shared by every layer.
    documents: std::sync::OnceLock<finetune_kernels::attention::Documents>,
    device: Device,
    cos: Tensor,
    sin: Tensor,
    /// cos and sin widened to f32 (the RoPE op's dtype), made on first use and shared by every
    /// layer (else each RoPE call of each layer makes and keeps its own copies in bf16).
    tables_f32: std::sync::OnceLock<(Tensor, Tensor)>,
    /// The number of this sequence in its run, the key of its tokens' LoRA dropout masks
    /// ([`crate::dropout`]; 0 unless [`Self::set_dropout_sequence`] says otherwise).
    dropout_sequence: u64,
}

impl SequenceContext {
    /// Numbers this sequence for the LoRA dropout masks of its tokens (the trainer: step ×
    /// batch + place in the step's batch, the same on every rank).
    pub fn set_dropout_sequence(&mut self, sequence: u64) {
        self.dropout_sequence = sequence;
    }

    /// The rows of a layer's input `[T, …]`: this sequence's tokens, in order (for
    /// [`Lora::dropout_input`]).
    pub fn dropout_rows(&self) -> Rows<'static> {
        Rows::Sequence(self.dropout_sequence)
    }

    /// The rows `tokens` of this sequence (rows gathered for experts).
    pub fn dropout_tokens<'a>(&self, tokens: &'a [u32]) -> Rows<'a> {
        Rows::Tokens {
            sequence: self.dropout_sequence,
            tokens,
        }
    }

    /// The fused attention's documents, uploaded to the device once per sequence.
    fn documents(&self) -> candle_core::Result<&finetune_kernels::attention::Documents> {
        if let Some(d) = self.documents.get() {
            return Ok(d);
        }
        let docs = finetune_kernels::attention::Documents::new(&self.doc_start, &self.device)?;
        Ok(self.documents.get_or_init(|| docs))
    }

    /// The RoPE tables in f32 (the compute dtype's values, widened once per sequence).
    fn rope_tables(&self) -> candle_core::Result<(&Tensor, &Tensor)> {
        if self.tables_f32.get().is_none() {
            let f32 = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
            let tables = (f32(&self.cos)?, f32(&self.sin)?);
            let _ = self.tables_f32.set(tables);
        }
        let (cos, sin) = self.tables_f32.get().expect("set above");
        Ok((cos, sin))
    }

    /// The additive mask: 0 where token i may attend to key j (a cached key, or one of its own
    /// document's keys up to itself), −∞ elsewhere.
    fn mask(&self) -> candle_core::Result<&Tensor> {
        if let Some(m) = self.mask.get() {
            return Ok(m);
        }
        let (t, past) = (self.t, self.past);
        let mask = if past == 0 {
            // Built on the device from the document starts.
            let doc = Tensor::new(self.doc_start.as_slice(), &self.device)?;
            let same_doc = doc.reshape((t, 1))?.broadcast_eq(&doc.reshape((1, t))?)?;
            let pos = Tensor::arange(0u32, t as u32, &self.device)?;
            let causal = pos.reshape((t, 1))?.broadcast_ge(&pos.reshape((1, t))?)?;
            let allowed = (same_doc * causal)?;
            let zeros = Tensor::zeros((t, t), DType::F32, &self.device)?;
            let blocked = Tensor::full(f32::NEG_INFINITY, (t, t), &self.device)?;
            allowed.where_cond(&zeros, &blocked)?.reshape((1, t, t))?
        } else {
            let doc = &self.doc_start;
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..past + t).map(move |j| {
                        let allowed = j < past || (j - past <= i && doc[j - past] == doc[i]);
                        if allowed {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect();
            Tensor::from_vec(mask, (1, t, past + t), &self.device)?
        };
        Ok(self.mask.get_or_init(|| mask))
    }
}

/// A loaded Qwen3-MoE model (base weights only): the whole model, or one rank's shard of it
/// ([`Qwen3Moe::load_shard`]).
pub struct Qwen3Moe {
    pub config: Qwen3MoeConfig,
    /// What this model holds ([`BaseShard::whole`] unless loaded as a rank's shard): `embed`
    /// (and an untied `lm_head`) hold rows `shard.vocab`, each MoE layer's `experts` the experts
    /// `shard.experts`, q/k/v the rows and o_proj the columns of heads `shard.heads`.
    shard: BaseShard,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: BaseWeight,
    device: Device,
    dtype: DType,
    moe_path: MoePath,
    attention_path: AttentionPath,
    /// Whether attention may use the fused op on the GPU (`false`: the plain path, for
    /// comparisons; the CPU always uses the fused op).
    fused_attention: bool,
    /// Seconds per forward phase while profiling ([`Qwen3Moe::set_phase_timing`]); `None` (the
    /// default) costs nothing: no device synchronization.
    phase_times: std::sync::Mutex<Option<std::collections::BTreeMap<&'static str, f64>>>,
}

/// The MoE path a model starts with: `FINETUNE_MOE_PATH` (a [`MoePath::from_name`] name) when
/// set, else grouped on a GPU and per expert on the CPU.
fn default_moe_path(device: &Device) -> MoePath {
    let named = std::env::var("FINETUNE_MOE_PATH").ok();
    match named.as_deref().map(|n| (n, MoePath::from_name(n))) {
        Some((_, Some(path))) => path,
        Some((n, None)) => {
            eprintln!(
                "FINETUNE_MOE_PATH={n}: not one of per-expert, batched, grouped, grouped-manual; ignored"
            );
            default_moe_path_of(device)
        }
        None => default_moe_path_of(device),
    }
}

fn default_moe_path_of(device: &Device) -> MoePath {
    if device.is_cuda() {
        MoePath::Grouped
    } else {
        MoePath::PerExpert
    }
}

/// x·Wᵀ for a frozen weight: a CustomOp whose backward computes dX only (candle's matmul
/// would also compute and keep dW).
fn linear(x: &Tensor, w: &BaseWeight) -> candle_core::Result<Tensor> {
    if let BaseWeight::Dense(t) = w {
        // A trainable weight ([`Qwen3Moe::make_trainable`]): candle's matmul, which also
        // gives dW.
        if t.is_variable() {
            return x.matmul(&t.t()?);
        }
    }
    match w {
        BaseWeight::Fp8 { q, scale_inv } if fp8_gemm(x, w) => {
            finetune_kernels::fp8_linear(&x.contiguous()?, q, scale_inv)
        }
        BaseWeight::Dense(t) if t.dtype() == x.dtype() => {
            finetune_kernels::frozen_linear(&x.contiguous()?, t)
        }
        // On the CPU memory is not the constraint: convert once and keep it for the backward.
        _ if x.device().is_cpu() => {
            finetune_kernels::frozen_linear(&x.contiguous()?, &w.dequantize(x.dtype())?)
        }
        _ => {
            // On the GPU: dequantized (or converted) by the op for the forward and again for the
            // backward, not kept by the graph in between.
            let (w, dtype) = (w.clone(), x.dtype());
            let weight: finetune_kernels::WeightFn =
                std::sync::Arc::new(move || w.dequantize(dtype));
            finetune_kernels::frozen_linear_lazy(&x.contiguous()?, weight)
        }
    }
}

/// Whether x·Wᵀ runs on the FP8 tensor cores (opt-in, `FINETUNE_FP8_GEMM=1`): an FP8 weight
/// `[.., out, in]` of a shape and activations that finetune_kernels::fp8_linear takes (else
/// today's dequantize + GEMM path, the reason printed once).
fn fp8_gemm(x: &Tensor, w: &BaseWeight) -> bool {
    match w {
        BaseWeight::Fp8 { q, .. } => {
            let d = q.dims();
            d.len() >= 2
                && finetune_kernels::fp8_linear::use_for(
                    x.dtype(),
                    x.device(),
                    d[d.len() - 2],
                    d[d.len() - 1],
                )
        }
        BaseWeight::Dense(_) => false,
    }
}

/// y = x·Wᵀ, plus s·(x·Aᵀ)·Bᵀ when the projection has an adapter (the adapter's path in f32,
/// whatever x's dtype).
/// `rows` are x's rows (their tokens, for the dropout masks).
fn project(
    x: &Tensor,
    p: &Proj,
    lora: Option<&Lora>,
    rows: &Rows<'_>,
) -> candle_core::Result<Tensor> {
    // An expert's A and B are views of its layer's stacked adapters (their gradients flow
    // into the stack).
    project_with(x, p, lora, lora.and_then(|l| l.get(&p.name)), rows)
}

/// [`project`] with the projection's adapter (A, B) given (`None`: no adapter).
fn project_with(
    x: &Tensor,
    p: &Proj,
    lora: Option<&Lora>,
    ab: Option<(Tensor, Tensor)>,
    rows: &Rows<'_>,
) -> candle_core::Result<Tensor> {
    let adapter = lora.zip(ab);
    if let Some((l, (a, b))) = &adapter {
        let frozen = !matches!(&p.w, BaseWeight::Dense(t) if t.is_variable());
        let fused = if x.device().is_cpu() {
            x.dtype() == DType::F32
        } else {
            // Opt-in on the GPU until a GPU session has run its test (FINETUNE_LORA_LINEAR_GPU=1).
            finetune_kernels::lora_linear::on_gpu()
        };
        if frozen && fused && !l.dropout_active() && !fp8_gemm(x, &p.w) {
            // One fused op with all three gradients (finetune_kernels::lora_linear, tested
            // against the plain formula below): five graph nodes fewer per projection, and
            // none of their intermediates kept for the backward.
            return finetune_kernels::lora_linear(x, &p.w.dequantize(x.dtype())?, a, b, l.scale);
        }
    }
    let y = linear(x, &p.w)?;
    match adapter {
        Some((l, (a, b))) => {
            let x = l.dropout_input(&x.to_dtype(DType::F32)?, &p.name, rows, 0)?;
            let delta = (x.matmul(&a.t()?)?.matmul(&b.t()?)? * l.scale)?;
            let dtype = y.dtype();
            y + delta.to_dtype(dtype)?
        }
        None => Ok(y),
    }
}

/// Whether the batched MoE path can run with `lora`: no adapters, or one on every expert's
/// gate, up and down (a partial set runs per expert).
fn batched_lora_covers(experts: &[Expert], lora: Option<&Lora>) -> bool {
    lora.is_none_or(|l| {
        experts.iter().all(|e| {
            [&e.gate, &e.up, &e.down]
                .iter()
                .all(|p| l.contains(&p.name))
        })
    })
}

/// The rows of a stacked experts' input, for the dropout masks: their tokens, and whose
/// expert each row is — grouped (`offsets`: rows `offsets[e]..offsets[e + 1]` are expert e's)
/// or batched (`[E, cap, …]`: row i is expert i / cap's).
struct StackRows<'a> {
    rows: Rows<'a>,
    offsets: Option<&'a [usize]>,
    cap: usize,
}

impl StackRows<'_> {
    fn expert_of(&self, row: usize) -> usize {
        match self.offsets {
            Some(o) => o.partition_point(|&start| start <= row) - 1,
            None => row / self.cap.max(1),
        }
    }
}

/// What the batched and grouped expert projections feed their LoRA path: the adapters' f32
/// input (`x32` when the caller already has it; dropout applied), A of the experts `names`
/// stacked `[E, r, in]` and s·B stacked `[E, out, r]` (s on the small B rather than on the
/// `[rows, out]` product: one full-size f32 tensor less per projection). A and B are the
/// adapter's own stacked variables when `names` are exactly one of its stacks (every expert of
/// the layer: no copy, and the stack gets its gradient in one piece); otherwise (never with
/// adapters made by [`Lora`] for this model) the experts' views are stacked for this use.
fn stacked_lora_inputs(
    x: &Tensor,
    x32: Option<&Tensor>,
    names: &[&str],
    l: &Lora,
    rows: &StackRows<'_>,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (a, b) = lora_stacks(names, l)?;
    let b = (b * l.scale)?;
    let x = match x32 {
        Some(x32) => x32.clone(),
        None => x.to_dtype(DType::F32)?,
    };
    let x = l.dropout_input_stacked(&x, names, |i| rows.expert_of(i), &rows.rows)?;
    Ok((x, a, b))
}

/// A `[E, r, in]` and B `[E, out, r]` of the experts `names` (in order): the adapter's own
/// stacked variables when `names` are exactly one of its stacks, else the experts' views
/// stacked for this use (never with adapters made by [`Lora`] for this model). Used by
/// [`stacked_lora_inputs`] and the grouped-manual path.
fn lora_stacks(names: &[&str], l: &Lora) -> candle_core::Result<(Tensor, Tensor)> {
    if let Some((a, b)) = l.stacked(names) {
        return Ok((a.clone(), b.clone()));
    }
    let mut parts = (
        Vec::with_capacity(names.len()),
        Vec::with_capacity(names.len()),
    );
    for name in names {
        let (a, b) = l
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no adapter for {name}")))?;
        parts.0.push(a);
        parts.1.push(b);
    }
    Ok((Tensor::stack(&parts.0, 0)?, Tensor::stack(&parts.1, 0)?))
}

/// y[e] = x[e]·W[e]ᵀ + s·(x[e]·A[e]ᵀ)·B[e]ᵀ for the experts named `names` (in order), x
/// `[E, C, in]`, W stacked `[E, out, in]`, the adapters the layer's stacked ones
/// ([`stacked_lora_inputs`]), the LoRA path in f32 on `x32` (x in f32,
/// shared by the projections that read the same input). s multiplies the small stacked B rather
/// than the `[E, C, out]` product: one full-size f32 tensor less per projection.
fn batched_project(
    x: &Tensor,
    x32: Option<&Tensor>,
    w: &BaseWeight,
    names: &[&str],
    lora: Option<&Lora>,
    rows: &StackRows<'_>,
) -> candle_core::Result<Tensor> {
    let y = finetune_kernels::frozen_batched_linear(x, &w.dequantize(x.dtype())?)?;
    let Some(l) = lora else { return Ok(y) };
    let (x, a, b) = stacked_lora_inputs(x, x32, names, l, rows)?;
    let delta = x.matmul(&a.transpose(1, 2)?)?.matmul(&b.transpose(1, 2)?)?;
    let dtype = y.dtype();
    y + delta.to_dtype(dtype)?
}

/// [`MoePath::Grouped`]'s projection: y[n] = x[n]·W[e]ᵀ + s·(x[n]·A[e]ᵀ)·B[e]ᵀ for the rows
/// `offsets[e]..offsets[e + 1]` of x `[N, in]` (expert e of `names`), W stacked `[E, out, in]`;
/// the LoRA path in f32 on `x32` (shared by projections reading the same input), the adapters
/// the layer's stacked ones ([`stacked_lora_inputs`]), s on the small B.
fn grouped_project(
    x: &Tensor,
    x32: Option<&Tensor>,
    w: &BaseWeight,
    names: &[&str],
    lora: Option<&Lora>,
    offsets: &std::sync::Arc<Vec<usize>>,
    rows: &StackRows<'_>,
) -> candle_core::Result<Tensor> {
    let y = match w {
        BaseWeight::Fp8 { q, scale_inv } if fp8_gemm(x, w) => {
            finetune_kernels::fp8_grouped_linear(x, q, scale_inv, offsets)?
        }
        BaseWeight::Dense(t) if t.dtype() == x.dtype() => {
            finetune_kernels::grouped_linear(x, t, offsets, false)?
        }
        _ => {
            // FP8 (or another dtype): dequantized by the op for each product and dropped after
            // it, instead of a bf16 copy of the stack kept by the graph until the backward.
            let (w, dtype) = (w.clone(), x.dtype());
            let (e, out, inp) = w
                .shape()
                .try_into()
                .map(|d: [usize; 3]| (d[0], d[1], d[2]))
                .map_err(|_| {
                    candle_core::Error::Msg(format!(
                        "grouped experts: weight {:?} is not [E, out, in]",
                        w.shape()
                    ))
                })?;
            let weight: finetune_kernels::WeightFn =
                std::sync::Arc::new(move || w.dequantize(dtype));
            finetune_kernels::grouped_linear_frozen(x, weight, (e, out, inp), offsets)?
        }
    };
    let Some(l) = lora else { return Ok(y) };
    let (x, a, b) = stacked_lora_inputs(x, x32, names, l, rows)?;
    let h = finetune_kernels::grouped_linear(&x, &a, offsets, true)?; // [N, r]
    let delta = finetune_kernels::grouped_linear(&h, &b, offsets, true)?; // [N, out]
    let dtype = y.dtype();
    y + delta.to_dtype(dtype)?
}

/// RMSNorm with a frozen weight: one fused op (finetune_kernels::rms_norm, dx-only backward)
/// instead of six candle ops, each with its own backward; statistics in f32, the result in x's
/// dtype.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if w.is_variable() {
        // A trainable norm (full-parameter training, [`Qwen3Moe::make_trainable`]): the fused
        // op's backward gives dx only, so plain ops, which also give dw.
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        return x.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w);
    }
    finetune_kernels::rms_norm(x, &w.to_dtype(DType::F32)?, eps)
}

fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    // Softmax is shift-invariant: the max only keeps exp() in range and carries no gradient.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// silu(x) = x · sigmoid(x) = x / (1 + e^(−x)).
fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    x / (x.neg()?.exp()? + 1.0)?
}

/// One expert's adapters (A, B) of gate, up and down (`None`: no adapter, or not run).
pub type ExpertLora = [Option<(Tensor, Tensor)>; 3];

/// The adapters (gate, up, down) of `experts` for a forward that runs those marked `used`
/// (the others get `None`s). Where a projection's adapters are one stack of exactly these
/// experts, slices whose gradients reach the stack as one tensor ([`Lora::expert_slices`]);
/// otherwise each expert's own (views: [`Lora::get`]). A narrow view per expert would add a
/// zero-padded full-size gradient into the stack per expert in backward: O(E²) for E experts.
fn expert_adapters(
    experts: &[Expert],
    used: &[bool],
    lora: Option<&Lora>,
) -> candle_core::Result<Vec<ExpertLora>> {
    let mut out: Vec<ExpertLora> = vec![[None, None, None]; experts.len()];
    let Some(l) = lora else { return Ok(out) };
    let picks: [fn(&Expert) -> &Proj; 3] = [|e| &e.gate, |e| &e.up, |e| &e.down];
    for (k, pick) in picks.into_iter().enumerate() {
        let names: Vec<&str> = experts.iter().map(|e| pick(e).name.as_str()).collect();
        match l.expert_slices(&names, used)? {
            Some(slices) => {
                for (slot, ab) in out.iter_mut().zip(slices) {
                    slot[k] = ab;
                }
            }
            None => {
                for ((slot, name), &u) in out.iter_mut().zip(&names).zip(used) {
                    slot[k] = if u { l.get(name) } else { None };
                }
            }
        }
    }
    Ok(out)
}

impl Expert {
    /// The expert on rows `x` (tokens `rows`).
    fn forward(
        &self,
        x: &Tensor,
        lora: Option<&Lora>,
        rows: &Rows<'_>,
    ) -> candle_core::Result<Tensor> {
        let adapters =
            [&self.gate, &self.up, &self.down].map(|p| lora.and_then(|l| l.get(&p.name)));
        self.forward_with(x, lora, adapters, rows)
    }

    /// [`Self::forward`] with the adapters of gate, up and down given.
    fn forward_with(
        &self,
        x: &Tensor,
        lora: Option<&Lora>,
        adapters: ExpertLora,
        rows: &Rows<'_>,
    ) -> candle_core::Result<Tensor> {
        let [ga, ua, da] = adapters;
        let g = project_with(x, &self.gate, lora, ga, rows)?;
        let u = project_with(x, &self.up, lora, ua, rows)?;
        let h = if g.device().is_cpu() {
            // One fused op (finetune_kernels::swiglu, tested against this formula) instead of
            // five, each with its own zero-filled gradient in backward.
            finetune_kernels::swiglu(&g, &u)?
        } else {
            (silu(&g)? * u)?
        };
        project_with(&h, &self.down, lora, da, rows)
    }
}

impl Qwen3Moe {
    /// Loads the weights of `config` from `weights`; every tensor must be there with its
    /// shape, and no tensor may be left over.
    pub fn load(config: Qwen3MoeConfig, weights: &Weights, device: &Device) -> Result<Self> {
        let whole = BaseShard::whole(&config);
        Self::load_shard(config, weights, device, &whole)
    }

    /// Loads only `shard` of the weights of `config` (a rank of a parallel run, module
    /// [`crate::shard`]): the experts, head rows/columns and vocabulary rows it names are read
    /// from the files, the rest of those tensors never is (it is checked by name and shape);
    /// norms, routers and dense MLPs are read whole. [`BaseShard::whole`] is [`Self::load`].
    /// A sharded model runs the pieces a parallel rank calls ([`Self::attention_heads`],
    /// [`Self::expert_forward`], [`Self::embed_tokens_rows`], [`Self::lm_head_rows`], …), not
    /// the whole forward.
    pub fn load_shard(
        config: Qwen3MoeConfig,
        weights: &Weights,
        device: &Device,
        shard: &BaseShard,
    ) -> Result<Self> {
        let c = &config;
        shard.check(c).map_err(|message| WeightsError::Slice {
            name: "(the base model)".into(),
            message: format!("shard {shard:?}: {message}"),
        })?;
        let (h, d) = (c.hidden_size, c.head_dim());
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let (heads, kv) = (shard.heads.clone(), shard.kv_heads(c));
        let vocab_cut = Cut::Rows(shard.vocab.clone());
        let embed =
            weights.tensor_cut("model.embed_tokens.weight", [c.vocab_size, h], &vocab_cut)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let proj = |name: String, out: usize, inp: usize| -> Result<Proj> {
                Ok(Proj {
                    w: weights.base_weight(&name, out, inp)?,
                    name,
                })
            };
            let proj_cut = |name: String, out: usize, inp: usize, cut: Cut| -> Result<Proj> {
                Ok(Proj {
                    w: weights.base_weight_cut(&name, out, inp, &cut)?,
                    name,
                })
            };
            let q_rows = Cut::Rows(heads.start * d..heads.end * d);
            let kv_rows = Cut::Rows(kv.start * d..kv.end * d);
            let o_cols = Cut::Cols(heads.start * d..heads.end * d);
            let attn = Attention {
                q: proj_cut(format!("{p}.self_attn.q_proj"), nh * d, h, q_rows)?,
                k: proj_cut(format!("{p}.self_attn.k_proj"), nkv * d, h, kv_rows.clone())?,
                v: proj_cut(format!("{p}.self_attn.v_proj"), nkv * d, h, kv_rows)?,
                o: proj_cut(format!("{p}.self_attn.o_proj"), h, nh * d, o_cols)?,
                q_norm: weights.tensor(&format!("{p}.self_attn.q_norm.weight"), &[d])?,
                k_norm: weights.tensor(&format!("{p}.self_attn.k_norm.weight"), &[d])?,
            };
            let expert = |prefix: &str, width: usize| -> Result<Expert> {
                Ok(Expert {
                    gate: proj(format!("{prefix}.gate_proj"), width, h)?,
                    up: proj(format!("{prefix}.up_proj"), width, h)?,
                    down: proj(format!("{prefix}.down_proj"), h, width)?,
                })
            };
            let mlp = if c.is_moe_layer(i) {
                let mi = c.moe_intermediate_size;
                // Experts of other shards: checked, never read.
                for e in (0..c.num_experts).filter(|e| !shard.experts.contains(e)) {
                    let prefix = format!("{p}.mlp.experts.{e}");
                    weights.skip_base_weight(&format!("{prefix}.gate_proj"), mi, h)?;
                    weights.skip_base_weight(&format!("{prefix}.up_proj"), mi, h)?;
                    weights.skip_base_weight(&format!("{prefix}.down_proj"), h, mi)?;
                }
                let mut experts: Vec<Expert> = shard
                    .experts
                    .clone()
                    .map(|e| expert(&format!("{p}.mlp.experts.{e}"), mi))
                    .collect::<Result<_>>()?;
                let mut stack = |pick: fn(&mut Expert) -> &mut Proj| -> Result<BaseWeight> {
                    let parts: Vec<BaseWeight> =
                        experts.iter_mut().map(|e| pick(e).w.clone()).collect();
                    let stacked = BaseWeight::stack(&parts).map_err(WeightsError::from)?;
                    for (index, e) in experts.iter_mut().enumerate() {
                        pick(e).w = stacked.get(index).map_err(WeightsError::from)?;
                    }
                    Ok(stacked)
                };
                let stacked = StackedExperts {
                    gate: stack(|e| &mut e.gate)?,
                    up: stack(|e| &mut e.up)?,
                    down: stack(|e| &mut e.down)?,
                };
                Mlp::Moe {
                    router: weights.base_weight(&format!("{p}.mlp.gate"), c.num_experts, h)?,
                    experts,
                    stacked,
                }
            } else {
                Mlp::Dense(expert(&format!("{p}.mlp"), c.intermediate_size)?)
            };
            layers.push(Layer {
                input_norm: weights.tensor(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: weights.tensor(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                attn,
                mlp,
            });
        }
        let norm = weights.tensor("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings {
            BaseWeight::Dense(embed.clone())
        } else {
            weights.base_weight_cut("lm_head", c.vocab_size, h, &vocab_cut)?
        };
        weights.check_all_used()?;
        Ok(Self {
            shard: shard.clone(),
            config,
            embed,
            layers,
            norm,
            lm_head,
            device: device.clone(),
            dtype: DType::F32,
            moe_path: default_moe_path(device),
            attention_path: default_attention_path(),
            fused_attention: true,
            phase_times: std::sync::Mutex::new(None),
        })
    }

    /// Lets GPU attention use the fused flash-attention op (`true`, the default) or the plain
    /// candle ops (`false`: scores, mask and probabilities materialized; for comparisons).
    pub fn set_fused_attention(&mut self, fused: bool) {
        self.fused_attention = fused;
    }

    /// Starts (`true`, clearing earlier figures) or stops timing the forward's phases: each
    /// phase is then bracketed by device synchronizations (slower; for `finetune bench train
    /// --profile`).
    pub fn set_phase_timing(&self, on: bool) {
        if let Ok(mut p) = self.phase_times.lock() {
            *p = on.then(Default::default);
        }
    }

    /// The figures gathered since [`Self::set_phase_timing`]`(true)`: seconds per phase, summed
    /// over layers and calls, and counters (`moe.*_rows`).
    pub fn phase_times(&self) -> Vec<(&'static str, f64)> {
        self.phase_times
            .lock()
            .ok()
            .and_then(|p| {
                p.as_ref()
                    .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            })
            .unwrap_or_default()
    }

    fn timing(&self) -> bool {
        self.phase_times.lock().is_ok_and(|p| p.is_some())
    }

    /// Adds `value` to the figure `what` while timing.
    fn record(&self, what: &'static str, value: f64) {
        if let Ok(mut p) = self.phase_times.lock() {
            if let Some(m) = p.as_mut() {
                *m.entry(what).or_default() += value;
            }
        }
    }

    /// Runs `f`, timed as `phase` between two device synchronizations while timing.
    fn timed<R>(
        &self,
        phase: &'static str,
        f: impl FnOnce() -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        if !self.timing() {
            return f();
        }
        self.device.synchronize()?;
        let started = std::time::Instant::now();
        let r = f()?;
        self.device.synchronize()?;
        self.record(phase, started.elapsed().as_secs_f64());
        Ok(r)
    }

    /// Logits `[T, vocab]` (f32) of one packed sequence: `position_ids` restart at 0 where a
    /// new document begins, and no token attends across documents.
    pub fn forward(&self, input_ids: &[u32], position_ids: &[u32]) -> candle_core::Result<Tensor> {
        self.forward_with(input_ids, position_ids, None)
    }

    /// [`Self::forward`] with LoRA adapters on the projections `lora` names.
    pub fn forward_with(
        &self,
        input_ids: &[u32],
        position_ids: &[u32],
        lora: Option<&Lora>,
    ) -> candle_core::Result<Tensor> {
        self.run(input_ids, position_ids, lora, None)
    }

    /// An empty key/value cache for [`Self::forward_cached`].
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
            len: 0,
        }
    }

    /// Logits `[n, vocab]` of `input_ids` continuing the one document held in `cache` (their
    /// positions follow the cached ones); the cache grows by them. Generation feeds the prompt
    /// once, then one token at a time.
    pub fn forward_cached(
        &self,
        input_ids: &[u32],
        cache: &mut KvCache,
        lora: Option<&Lora>,
    ) -> candle_core::Result<Tensor> {
        let start = cache.len as u32;
        let positions: Vec<u32> = (start..start + input_ids.len() as u32).collect();
        self.run(input_ids, &positions, lora, Some(cache))
    }

    fn run(
        &self,
        input_ids: &[u32],
        position_ids: &[u32],
        lora: Option<&Lora>,
        mut cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let past = cache.as_ref().map_or(0, |c| c.len);
        let ctx = self.sequence_context(position_ids, past)?;
        let mut x = self.embed_tokens(input_ids)?;
        for index in 0..self.layers.len() {
            x = self.layer_forward(index, &x, &ctx, lora, cache.as_deref_mut())?;
        }
        if let Some(cache) = cache {
            cache.len += ctx.t;
        }
        self.head(&x)
    }

    /// Computes in `dtype` from now on: f32 (the default) or bf16. bf16 is the GPU's compute
    /// dtype; on the CPU it runs too (candle 0.11's CPU matmul widens bf16 operands to f32 and
    /// rounds the product once; the fused ops read bf16 as f32 and round their results once),
    /// slower than f32 and for comparisons (tests of the bf16 paths on a machine without GPU).
    pub fn set_compute_dtype(&mut self, dtype: DType) -> candle_core::Result<()> {
        match dtype {
            DType::F32 | DType::BF16 => {}
            other => candle_core::bail!("compute dtype {other:?}: expected f32 or bf16"),
        }
        self.dtype = dtype;
        Ok(())
    }

    /// The compute dtype (see [`Self::set_compute_dtype`]).
    pub fn compute_dtype(&self) -> DType {
        self.dtype
    }

    /// Chooses how MoE blocks run their experts (default: batched on a GPU, per expert on
    /// the CPU).
    pub fn set_moe_path(&mut self, path: MoePath) {
        self.moe_path = path;
    }

    /// Chooses how decoder layers run their attention half (default: the chain, or
    /// `FINETUNE_ATTENTION_BLOCK`).
    pub fn set_attention_path(&mut self, path: AttentionPath) {
        self.attention_path = path;
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// What this model holds of the base weights ([`BaseShard::whole`] unless loaded by
    /// [`Self::load_shard`]).
    pub fn shard(&self) -> &BaseShard {
        &self.shard
    }

    /// Fails, naming `what` and the shard, unless the model holds every expert and head.
    fn require_whole(&self, what: &str) -> candle_core::Result<()> {
        let c = &self.config;
        if self.shard.experts != (0..c.num_experts)
            || self.shard.heads != (0..c.num_attention_heads)
        {
            candle_core::bail!(
                "{what} needs the whole model; this one holds only experts {:?} and heads {:?} \
                 (a parallel rank's shard)",
                self.shard.experts,
                self.shard.heads
            );
        }
        Ok(())
    }

    /// Fails, naming `what`, unless the model holds the whole vocabulary.
    fn require_whole_vocab(&self, what: &str) -> candle_core::Result<()> {
        if self.shard.vocab != (0..self.config.vocab_size) {
            candle_core::bail!(
                "{what} needs the whole vocabulary; this model holds rows {:?} of {} (a \
                 vocabulary-parallel rank's shard)",
                self.shard.vocab,
                self.config.vocab_size
            );
        }
        Ok(())
    }

    /// Embeddings `[T, hidden]` (in the compute dtype) of `input_ids`; the embedding is frozen.
    pub fn embed_tokens(&self, input_ids: &[u32]) -> candle_core::Result<Tensor> {
        self.require_whole_vocab("the embedding lookup")?;
        let ids = Tensor::new(input_ids, &self.device)?;
        self.embed.index_select(&ids, 0)?.to_dtype(self.dtype)
    }

    /// Final norm and lm_head: logits `[T, vocab]` (f32 whatever the compute dtype, for the
    /// loss) of hidden states `[T, hidden]`.
    pub fn head(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.require_whole_vocab("lm_head")?;
        let x = rms_norm(x, &self.norm, self.config.rms_norm_eps)?;
        linear(&x, &self.lm_head)?.to_dtype(DType::F32)
    }

    /// [`Self::loss_sum_tensor`] of [`Self::head`]'s logits without the `[T, vocab]` logits:
    /// the final norm, then lm_head fused with the loss, chunked over the target tokens
    /// (finetune_kernels::linear_cross_entropy; differentiable in `x`, lm_head frozen).
    pub fn head_loss_sum(&self, x: &Tensor, labels: &[i64]) -> candle_core::Result<Tensor> {
        self.require_whole_vocab("lm_head")?;
        let lm_head_trainable = matches!(&self.lm_head, BaseWeight::Dense(t) if t.is_variable());
        if lm_head_trainable || self.norm.is_variable() {
            // Full-parameter training: the fused loss treats lm_head as frozen.
            return Self::loss_sum_tensor(&self.head(x)?, labels);
        }
        let x = rms_norm(x, &self.norm, self.config.rms_norm_eps)?;
        // Position t predicts labels[t + 1]; the last position predicts nothing.
        let targets: Vec<i64> = labels[1..].iter().copied().chain([-100]).collect();
        let w = self.lm_head.dequantize(x.dtype())?;
        finetune_kernels::linear_cross_entropy(&x, &w, &targets, None)
    }

    /// Embeddings of `input_ids` from the vocabulary rows `rows` only (a vocabulary-parallel
    /// rank's shard): an id outside `rows` gets a zero row, so that summing the shards' results
    /// over the ranks gives [`Self::embed_tokens`] exactly (one non-zero term per row). The
    /// model must hold `rows` (a rank's shard holds exactly its rows, a whole model all).
    pub fn embed_tokens_rows(
        &self,
        input_ids: &[u32],
        rows: std::ops::Range<usize>,
    ) -> candle_core::Result<Tensor> {
        let held = &self.shard.vocab;
        if rows.is_empty() || rows.start < held.start || rows.end > held.end {
            candle_core::bail!(
                "embedding rows {rows:?} of a vocabulary of {}: this model holds rows {held:?}",
                self.config.vocab_size
            );
        }
        let inside = |id: u32| rows.contains(&(id as usize));
        let local: Vec<u32> = input_ids
            .iter()
            .map(|&id| {
                if inside(id) {
                    id - rows.start as u32
                } else {
                    0
                }
            })
            .collect();
        let mask: Vec<u8> = input_ids.iter().map(|&id| u8::from(inside(id))).collect();
        // The held rows themselves when they are the ones asked for (a rank's shard).
        let shard = if rows == *held {
            self.embed.clone()
        } else {
            self.embed.narrow(0, rows.start - held.start, rows.len())?
        };
        let vals = shard.index_select(&Tensor::new(local.as_slice(), &self.device)?, 0)?;
        let mask = Tensor::new(mask.as_slice(), &self.device)?
            .reshape((input_ids.len(), 1))?
            .broadcast_as(vals.shape())?;
        // where_cond, not a product: an exact zero whatever the row holds.
        mask.where_cond(&vals, &vals.zeros_like()?)?
            .to_dtype(self.dtype)
    }

    /// The final RMSNorm (the input of lm_head).
    pub fn final_norm(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        rms_norm(x, &self.norm, self.config.rms_norm_eps)
    }

    /// Rows `rows` of lm_head (the embedding with tied embeddings) in `dtype`, frozen: the held
    /// rows of a rank's shard, else a view of a dense weight; an FP8 weight is dequantized (the
    /// held rows: a rank's shard holds only its own) first (checkpoints keep lm_head in bf16,
    /// so this is not the 480B's path).
    pub fn lm_head_rows(
        &self,
        rows: std::ops::Range<usize>,
        dtype: DType,
    ) -> candle_core::Result<Tensor> {
        let held = &self.shard.vocab;
        if rows.is_empty() || rows.start < held.start || rows.end > held.end {
            candle_core::bail!(
                "lm_head rows {rows:?} of a vocabulary of {}: this model holds rows {held:?}",
                self.config.vocab_size
            );
        }
        let local = rows.start - held.start;
        let w = match &self.lm_head {
            BaseWeight::Dense(t) if rows == *held => t.to_dtype(dtype)?,
            BaseWeight::Dense(t) => t.narrow(0, local, rows.len())?.to_dtype(dtype)?,
            w => w.dequantize(dtype)?.narrow(0, local, rows.len())?,
        };
        Ok(w.detach())
    }

    /// What every layer of one forward shares: the attention mask and the RoPE tables of
    /// `position_ids`, after `past` cached tokens.
    pub fn sequence_context(
        &self,
        position_ids: &[u32],
        past: usize,
    ) -> candle_core::Result<SequenceContext> {
        let c = &self.config;
        let t = position_ids.len();
        let d = c.head_dim();
        // Document of each token.
        let mut doc: Vec<u32> = Vec::with_capacity(t);
        for (i, &p) in position_ids.iter().enumerate() {
            let prev = if i == 0 { 0 } else { doc[i - 1] };
            doc.push(if i > 0 && p <= position_ids[i - 1] && p == 0 {
                prev + 1
            } else {
                prev
            });
        }
        // RoPE tables at the given positions: angle = position · inv_freq[i], in f32 as
        // transformers computes it; cos/sin scaled by the attention factor (YaRN).
        let (inv_freq, attention_factor) = c.rope_frequencies();
        let mut cos = Vec::with_capacity(t * d);
        let mut sin = Vec::with_capacity(t * d);
        for &p in position_ids {
            let angles: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
            // cos/sin repeat over both halves, as transformers' cat((freqs, freqs)).
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos() * attention_factor));
                sin.extend(angles.iter().map(|a| a.sin() * attention_factor));
            }
        }
        // Cast to the compute dtype once, as transformers' rotary embedding does.
        let cos = Tensor::from_vec(cos, (t, 1, d), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (t, 1, d), &self.device)?.to_dtype(self.dtype)?;
        let mut doc_start: Vec<u32> = Vec::with_capacity(t);
        for i in 0..t {
            let same = i > 0 && doc[i] == doc[i - 1];
            doc_start.push(if same { doc_start[i - 1] } else { i as u32 });
        }
        Ok(SequenceContext {
            t,
            past,
            doc_start,
            mask: std::sync::OnceLock::new(),
            documents: std::sync::OnceLock::new(),
            device: self.device.clone(),
            cos,
            sin,
            tables_f32: std::sync::OnceLock::new(),
            dropout_sequence: 0,
        })
    }

    /// Decoder layer `index` on hidden states `x` `[T, hidden]`: the unit of activation
    /// recompute (the trainer keeps only each layer's input and replays the layer in backward).
    pub fn layer_forward(
        &self,
        index: usize,
        x: &Tensor,
        ctx: &SequenceContext,
        lora: Option<&Lora>,
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        self.require_whole("a whole decoder layer")?;
        let eps = self.config.rms_norm_eps;
        let layer = &self.layers[index];
        let rows = ctx.dropout_rows();
        let x = self.attention_forward(index, x, ctx, lora, cache)?;

        // MLP.
        let n = self.timed("mlp.norm", || rms_norm(&x, &layer.post_norm, eps))?;
        let y = match &layer.mlp {
            Mlp::Dense(e) => e.forward(&n, lora, &rows)?,
            Mlp::Moe {
                router,
                experts,
                stacked,
            } => match self.moe_path {
                MoePath::Batched if batched_lora_covers(experts, lora) => {
                    self.moe_batched(&n, router, experts, stacked, lora, ctx)?
                }
                MoePath::Grouped | MoePath::GroupedManual if batched_lora_covers(experts, lora) => {
                    self.moe_grouped(&n, router, experts, stacked, lora, ctx)?
                }
                _ => self.timed("moe.per_expert", || {
                    self.moe(&n, router, experts, lora, ctx)
                })?,
            },
        };
        x + y
    }

    /// The attention half of decoder layer `index` on hidden states x `[T, hidden]`:
    /// h = x + o_proj(attention(…)) as [`Self::layer_forward`] runs it (the chain of autograd
    /// ops, or [`AttentionPath::Manual`]'s node where it applies), the KV cache extended when
    /// given.
    pub fn attention_forward(
        &self,
        index: usize,
        x: &Tensor,
        ctx: &SequenceContext,
        lora: Option<&Lora>,
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        self.require_whole("a whole decoder layer")?;
        let c = &self.config;
        let eps = c.rms_norm_eps;
        let (nh, nkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let t = ctx.t;
        // One fused op (finetune_kernels::rope: the formula above, backward the transposed map).
        let (cos, sin) = ctx.rope_tables()?;
        let rope = |x: &Tensor| finetune_kernels::rope(x, cos, sin);
        let layer = &self.layers[index];
        let rows = ctx.dropout_rows();
        let a = &layer.attn;
        if cache.is_none() && ctx.past == 0 && self.attention_block_applies(layer, x, lora) {
            // AttentionPath::Manual: the same math as one node with a hand-written backward.
            self.timed("attn.block", || self.attention_block(layer, x, ctx, lora))
        } else {
            let (q, mut k, mut v) = self.timed("attn.qkv", || {
                let n = rms_norm(x, &layer.input_norm, eps)?;
                let q = project(&n, &a.q, lora, &rows)?.reshape((t, nh, d))?;
                let k = project(&n, &a.k, lora, &rows)?.reshape((t, nkv, d))?;
                let v = project(&n, &a.v, lora, &rows)?.reshape((t, nkv, d))?;
                let q = rope(&rms_norm(&q, &a.q_norm, eps)?)?;
                let k = rope(&rms_norm(&k, &a.k_norm, eps)?)?;
                // [kv heads, T, d], after the cached keys/values of this layer.
                Ok((
                    q,
                    k.transpose(0, 1)?.contiguous()?,
                    v.transpose(0, 1)?.contiguous()?,
                ))
            })?;
            if let Some(cache) = cache {
                if let Some((pk, pv)) = &cache.layers[index] {
                    k = Tensor::cat(&[pk, &k], 1)?;
                    v = Tensor::cat(&[pv, &v], 1)?;
                }
                cache.layers[index] = Some((k.clone(), v.clone()));
            }
            let attn = self.timed("attn.core", || self.attend(&q, &k, &v, ctx))?;
            self.timed("attn.o_proj", || x + project(&attn, &a.o, lora, &rows)?)
        }
    }

    /// Causal grouped-query attention of q `[T, H, d]` (after RoPE) over k, v `[G, past + T,
    /// d]` (H a multiple of G: query head h reads key/value head h / (H/G)), each token seeing
    /// the cached keys and its own document's keys up to itself → `[T, H·d]` in q's dtype. The
    /// whole layer's heads ([`Self::layer_forward`]) or a tensor-parallel rank's whole groups
    /// of them ([`Self::attention_heads`]): the same ordinary GQA problem, smaller.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &SequenceContext,
    ) -> candle_core::Result<Tensor> {
        let (t, nh, d) = q.dims3()?;
        let (nkv, keys, _) = k.dims3()?;
        let past = ctx.past;
        if q.device().is_cpu()
            || (self.fused_attention && finetune_kernels::attention::cuda_supported(d, q.dtype()))
        {
            // One fused op (finetune_kernels::causal_attention, a flash-attention kernel on
            // the GPU): keys in a token's future or in another document are never visited;
            // no scores, mask or probabilities tensors. The plain ops below remain for head
            // dims the CUDA kernels do not cover.
            let scale = 1.0 / (d as f64).sqrt();
            return finetune_kernels::causal_attention_docs(q, k, v, ctx.documents()?, past, scale);
        }
        // [heads, T, d], key/value heads repeated for their query group.
        let group = nh / nkv;
        let q = q.transpose(0, 1)?.contiguous()?;
        let k = k
            .unsqueeze(1)?
            .broadcast_as((nkv, group, keys, d))?
            .reshape((nh, keys, d))?;
        let v = v
            .unsqueeze(1)?
            .broadcast_as((nkv, group, keys, d))?
            .reshape((nh, keys, d))?;
        // Scores in the compute dtype, the softmax in f32, the weights back in the compute
        // dtype for ·V (transformers' eager attention).
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?
            .to_dtype(DType::F32)?
            .broadcast_add(ctx.mask()?)?;
        let attn = softmax_last(&scores)?.to_dtype(v.dtype())?.matmul(&v)?; // [nh, T, d]
        attn.transpose(0, 1)?.reshape((t, nh * d))
    }

    fn moe(
        &self,
        x: &Tensor,
        router: &BaseWeight,
        experts: &[Expert],
        lora: Option<&Lora>,
        ctx: &SequenceContext,
    ) -> candle_core::Result<Tensor> {
        let n_exp = experts.len();
        let (weights, routed) = self.route_tokens(x, router, n_exp)?;
        // Every expert's outputs are concatenated in expert order, weighted by one gather of
        // the routing weights, and added into the tokens' rows by one index_add (per token in
        // expert order, the order the per-expert loop added them in). Inputs are gathered per
        // expert: the backward of a narrow of one big gather would zero-fill a full
        // [T·k, hidden] gradient per expert.
        //
        // The adapters of the experts that run, when stacked (every expert of the layer has
        // one): slices whose gradients reach each stack as one tensor (`Lora::expert_slices`),
        // not a narrow view per expert (one full-size zero-padded gradient each).
        let used: Vec<bool> = routed.iter().map(|t| !t.is_empty()).collect();
        let mut adapters = expert_adapters(experts, &used, lora)?;
        let mut outputs = Vec::with_capacity(n_exp);
        let (mut all_tokens, mut weight_index) = (Vec::new(), Vec::new());
        for (e, toks) in routed.iter().enumerate() {
            if toks.is_empty() {
                continue;
            }
            let idx = Tensor::new(toks.as_slice(), &self.device)?;
            let xe = x.index_select(&idx, 0)?;
            let ab = std::mem::take(&mut adapters[e]);
            outputs.push(experts[e].forward_with(&xe, lora, ab, &ctx.dropout_tokens(toks))?);
            all_tokens.extend_from_slice(toks);
            weight_index.extend(toks.iter().map(|&tok| tok * n_exp as u32 + e as u32));
        }
        let weight_index = Tensor::new(weight_index.as_slice(), &self.device)?;
        let w = weights
            .flatten_all()?
            .index_select(&weight_index, 0)?
            .unsqueeze(1)?;
        let y = Tensor::cat(&outputs, 0)?.broadcast_mul(&w)?;
        let all_tokens = Tensor::new(all_tokens.as_slice(), &self.device)?;
        x.zeros_like()?.index_add(&all_tokens, &y, 0)
    }

    /// [`MoePath::Batched`]: the routing of [`Self::moe`], then every expert at once on its
    /// tokens gathered into `[E, C, hidden]` (C = the largest group; pad slots are zero rows
    /// whose routing weight is 0, so they add nothing and get no gradient) by
    /// finetune-kernels' `gather_rows`, one batched GEMM per projection, and `sum_rows` back,
    /// each token's experts summed in expert order (the order the per-expert path adds in).
    fn moe_batched(
        &self,
        x: &Tensor,
        router: &BaseWeight,
        experts: &[Expert],
        stacked: &StackedExperts,
        lora: Option<&Lora>,
        ctx: &SequenceContext,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (t, h) = x.dims2()?;
        let n_exp = experts.len();
        let started = self.timing().then(|| {
            let _ = self.device.synchronize();
            std::time::Instant::now()
        });
        let (weights, routed) = self.route_tokens(x, router, n_exp)?;
        let cap = routed.iter().map(Vec::len).max().unwrap_or(0).max(1);
        // Row t of the padded input is zeros; entry t·E of the padded weights is 0.
        let mut rows = vec![t as u32; n_exp * cap];
        let mut weight_index = vec![(t * n_exp) as u32; n_exp * cap];
        for (e, toks) in routed.iter().enumerate() {
            for (j, &tok) in toks.iter().enumerate() {
                rows[e * cap + j] = tok;
                weight_index[e * cap + j] = tok * n_exp as u32 + e as u32;
            }
        }
        // Row e·cap + j is expert e's; a padding row names token t (its input is zero).
        let stack_rows = StackRows {
            rows: ctx.dropout_tokens(&rows),
            offsets: None,
            cap,
        };
        let perm = std::sync::Arc::new(Permutation::new(rows.clone(), t, &self.device)?);
        // Pad slots name entry T·E of the weight table, past its end: they read 0.
        let weight_perm =
            std::sync::Arc::new(Permutation::new(weight_index, t * n_exp, &self.device)?);
        if let Some(started) = started {
            self.device.synchronize()?;
            self.record("moe.route", started.elapsed().as_secs_f64());
            self.record("moe.padded_rows", (n_exp * cap) as f64);
            self.record("moe.routed_rows", (t * c.num_experts_per_tok) as f64);
        }
        let names = |pick: fn(&Expert) -> &Proj| -> Vec<&str> {
            experts.iter().map(|e| pick(e).name.as_str()).collect()
        };
        let y = self.timed("moe.experts", || {
            let xs = gather_rows(x, &perm)?.reshape((n_exp, cap, h))?;
            // The adapters' f32 input, once for gate and up.
            let xs32 = match lora {
                Some(_) => Some(xs.to_dtype(DType::F32)?),
                None => None,
            };
            let sr = &stack_rows;
            let g = batched_project(
                &xs,
                xs32.as_ref(),
                &stacked.gate,
                &names(|e| &e.gate),
                lora,
                sr,
            )?;
            let u = batched_project(&xs, xs32.as_ref(), &stacked.up, &names(|e| &e.up), lora, sr)?;
            let h = (silu(&g)? * u)?;
            batched_project(&h, None, &stacked.down, &names(|e| &e.down), lora, sr)
        })?;
        self.timed("moe.combine", || {
            let w = slot_weights(&weights, &weight_perm)?;
            let y = y.reshape((n_exp * cap, h))?.broadcast_mul(&w)?;
            sum_rows(&y, &perm)
        })
    }

    /// [`MoePath::Grouped`]: the routing of [`Self::moe`], then every expert at once on its
    /// tokens gathered into `[T·k, hidden]` sorted by expert (finetune-kernels' `gather_rows`,
    /// no padding), one GEMM per expert and projection on exactly its rows, and `sum_rows` back
    /// (each token's experts summed in expert order, the order the per-expert path adds in).
    fn moe_grouped(
        &self,
        x: &Tensor,
        router: &BaseWeight,
        experts: &[Expert],
        stacked: &StackedExperts,
        lora: Option<&Lora>,
        ctx: &SequenceContext,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let t = x.dims2()?.0;
        let n_exp = experts.len();
        let started = self.timing().then(|| {
            let _ = self.device.synchronize();
            std::time::Instant::now()
        });
        let (weights, routed) = self.route_tokens(x, router, n_exp)?;
        if self.moe_path == MoePath::GroupedManual && lora.is_none_or(|l| !l.dropout_active()) {
            return self.moe_grouped_manual(x, &weights, &routed, experts, stacked, lora, started);
        }
        let mut offsets = Vec::with_capacity(n_exp + 1);
        offsets.push(0);
        let (mut rows, mut weight_index) = (Vec::new(), Vec::new());
        for (e, toks) in routed.iter().enumerate() {
            rows.extend_from_slice(toks);
            weight_index.extend(toks.iter().map(|&tok| tok * n_exp as u32 + e as u32));
            offsets.push(rows.len());
        }
        let offsets = std::sync::Arc::new(offsets);
        let stack_rows = StackRows {
            rows: ctx.dropout_tokens(&rows),
            offsets: Some(&offsets),
            cap: 0,
        };
        let perm = std::sync::Arc::new(Permutation::new(rows.clone(), t, &self.device)?);
        let weight_perm =
            std::sync::Arc::new(Permutation::new(weight_index, t * n_exp, &self.device)?);
        if let Some(started) = started {
            self.device.synchronize()?;
            self.record("moe.route", started.elapsed().as_secs_f64());
            self.record("moe.routed_rows", (t * c.num_experts_per_tok) as f64);
        }
        let names = |pick: fn(&Expert) -> &Proj| -> Vec<&str> {
            experts.iter().map(|e| pick(e).name.as_str()).collect()
        };
        let y = self.timed("moe.experts", || {
            let xs = gather_rows(x, &perm)?;
            let xs32 = match lora {
                Some(_) => Some(xs.to_dtype(DType::F32)?),
                None => None,
            };
            let g = grouped_project(
                &xs,
                xs32.as_ref(),
                &stacked.gate,
                &names(|e| &e.gate),
                lora,
                &offsets,
                &stack_rows,
            )?;
            let u = grouped_project(
                &xs,
                xs32.as_ref(),
                &stacked.up,
                &names(|e| &e.up),
                lora,
                &offsets,
                &stack_rows,
            )?;
            // One fused op (finetune_kernels::swiglu, f32 arithmetic, both gradients in one
            // pass) instead of five element-wise ops and their backward edges.
            let h = finetune_kernels::swiglu(&g, &u)?;
            grouped_project(
                &h,
                None,
                &stacked.down,
                &names(|e| &e.down),
                lora,
                &offsets,
                &stack_rows,
            )
        })?;
        self.timed("moe.combine", || {
            let w = slot_weights(&weights, &weight_perm)?;
            sum_rows(&y.broadcast_mul(&w)?, &perm)
        })
    }

    /// [`MoePath::GroupedManual`]: after [`Self::moe_grouped`]'s routing, the routed experts
    /// as one `finetune_kernels::moe_experts` node (same math, hand-written backward).
    #[allow(clippy::too_many_arguments)]
    fn moe_grouped_manual(
        &self,
        x: &Tensor,
        weights: &Tensor,
        routed: &[Vec<u32>],
        experts: &[Expert],
        stacked: &StackedExperts,
        lora: Option<&Lora>,
        started: Option<std::time::Instant>,
    ) -> candle_core::Result<Tensor> {
        use finetune_kernels::moe_experts::{
            moe_experts, ExpertStacks, FrozenStack, Routing, StackedAdapters,
        };
        let t = x.dims2()?.0;
        let routing = std::sync::Arc::new(Routing::new(routed, t, &self.device)?);
        if let Some(started) = started {
            self.device.synchronize()?;
            self.record("moe.route", started.elapsed().as_secs_f64());
            self.record("moe.routed_rows", routing.slots() as f64);
        }
        let dtype = x.dtype();
        let frozen = |w: &BaseWeight| -> candle_core::Result<FrozenStack> {
            let dims = w.shape().try_into().map_err(|_| {
                candle_core::Error::Msg(format!(
                    "grouped experts: weight {:?} is not [E, out, in]",
                    w.shape()
                ))
            })?;
            let [e, out, inp]: [usize; 3] = dims;
            // Dense weights in the compute dtype come back as they are (no copy); FP8 stacks
            // are dequantized for each product and dropped after it.
            let w = w.clone();
            Ok(FrozenStack::new(
                std::sync::Arc::new(move || w.dequantize(dtype)),
                (e, out, inp),
            ))
        };
        let base = ExpertStacks {
            gate: frozen(&stacked.gate)?,
            up: frozen(&stacked.up)?,
            down: frozen(&stacked.down)?,
        };
        let adapters = match lora {
            Some(l) => {
                let stacks = |pick: fn(&Expert) -> &Proj| {
                    let names: Vec<&str> = experts.iter().map(|e| pick(e).name.as_str()).collect();
                    lora_stacks(&names, l)
                };
                Some(StackedAdapters {
                    gate: stacks(|e| &e.gate)?,
                    up: stacks(|e| &e.up)?,
                    down: stacks(|e| &e.down)?,
                    scale: l.scale,
                })
            }
            None => None,
        };
        self.timed("moe.experts", || {
            moe_experts(x, weights, &routing, &base, adapters.as_ref())
        })
    }

    /// Whether `layer`'s attention half runs as [`AttentionPath::Manual`]'s node for input x
    /// (without a KV cache, which the caller checks): the path chosen, and nothing the chain
    /// does that the node does not — trainable norms or projections (full-parameter training),
    /// LoRA dropout (its masks are drawn per use), the plain attention ops (head dims or dtypes
    /// the fused op does not cover on the GPU, or `set_fused_attention(false)`), the FP8
    /// tensor-core GEMM on a projection.
    fn attention_block_applies(&self, layer: &Layer, x: &Tensor, lora: Option<&Lora>) -> bool {
        let a = &layer.attn;
        let projections = [&a.q, &a.k, &a.v, &a.o];
        self.attention_path == AttentionPath::Manual
            && lora.is_none_or(|l| !l.dropout_active())
            && ![&layer.input_norm, &a.q_norm, &a.k_norm]
                .iter()
                .any(|w| w.is_variable())
            && !projections.iter().any(|p| {
                matches!(&p.w, BaseWeight::Dense(t) if t.is_variable()) || fp8_gemm(x, &p.w)
            })
            && (x.device().is_cpu()
                || (self.fused_attention
                    && finetune_kernels::attention::cuda_supported(
                        self.config.head_dim(),
                        x.dtype(),
                    )))
    }

    /// [`AttentionPath::Manual`]: h = x + o_proj(attention(…)) of `layer` as one
    /// `finetune_kernels::attention_block` node (the chain's math, hand-written backward).
    fn attention_block(
        &self,
        layer: &Layer,
        x: &Tensor,
        ctx: &SequenceContext,
        lora: Option<&Lora>,
    ) -> candle_core::Result<Tensor> {
        use finetune_kernels::attention_block::{
            attention_block, AttentionWeights, BlockAdapters, FrozenWeight, Positions,
        };
        let c = &self.config;
        let a = &layer.attn;
        let dtype = x.dtype();
        let frozen = |p: &Proj| -> candle_core::Result<FrozenWeight> {
            let [out, inp]: [usize; 2] = p.w.shape().try_into().map_err(|_| {
                candle_core::Error::Msg(format!(
                    "attention block: weight {} is {:?}, not [out, in]",
                    p.name,
                    p.w.shape()
                ))
            })?;
            // Dense weights in the compute dtype come back as they are (no copy); FP8 ones are
            // dequantized for each product and dropped after it.
            let w = p.w.clone();
            Ok(FrozenWeight::new(
                std::sync::Arc::new(move || w.dequantize(dtype)),
                (out, inp),
            ))
        };
        let weights = AttentionWeights {
            input_norm: layer.input_norm.clone(),
            q: frozen(&a.q)?,
            k: frozen(&a.k)?,
            v: frozen(&a.v)?,
            o: frozen(&a.o)?,
            q_norm: a.q_norm.clone(),
            k_norm: a.k_norm.clone(),
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim(),
            eps: c.rms_norm_eps,
        };
        let adapters = lora.map(|l| BlockAdapters {
            q: l.get(&a.q.name),
            k: l.get(&a.k.name),
            v: l.get(&a.v.name),
            o: l.get(&a.o.name),
            scale: l.scale,
        });
        let (cos, sin) = ctx.rope_tables()?;
        let positions = Positions {
            cos,
            sin,
            docs: ctx.documents()?,
        };
        attention_block(x, &weights, adapters.as_ref(), &positions)
    }

    /// The projections LoRA can adapt, with their `[out, in]` shapes, in model order: those of
    /// the whole model, also when this one holds a shard ([`Self::targets_of`]).
    pub fn lora_targets(&self) -> Vec<(String, usize, usize)> {
        if !self.shard.is_whole(&self.config) {
            return Self::targets_of(&self.config);
        }
        let mut out = Vec::new();
        let mut push = |p: &Proj| {
            let s = p.w.shape();
            out.push((p.name.clone(), s[0], s[1]));
        };
        for layer in &self.layers {
            let a = &layer.attn;
            for p in [&a.q, &a.k, &a.v, &a.o] {
                push(p);
            }
            let experts: Vec<&Expert> = match &layer.mlp {
                Mlp::Dense(e) => vec![e],
                Mlp::Moe { experts, .. } => experts.iter().collect(),
            };
            for e in experts {
                for p in [&e.gate, &e.up, &e.down] {
                    push(p);
                }
            }
        }
        out
    }

    /// [`Self::lora_targets`] of a whole model of `config`, from the configuration alone (a
    /// parallel run's adapter is made before any rank loads its shard).
    pub fn targets_of(c: &Qwen3MoeConfig) -> Vec<(String, usize, usize)> {
        let (h, d) = (c.hidden_size, c.head_dim());
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let mut out = Vec::new();
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.self_attn.q_proj"), nh * d, h));
            out.push((format!("{p}.self_attn.k_proj"), nkv * d, h));
            out.push((format!("{p}.self_attn.v_proj"), nkv * d, h));
            out.push((format!("{p}.self_attn.o_proj"), h, nh * d));
            let mut mlp = |prefix: String, m: usize| {
                out.push((format!("{prefix}.gate_proj"), m, h));
                out.push((format!("{prefix}.up_proj"), m, h));
                out.push((format!("{prefix}.down_proj"), h, m));
            };
            if c.is_moe_layer(i) {
                for e in 0..c.num_experts {
                    mlp(format!("{p}.mlp.experts.{e}"), c.moe_intermediate_size);
                }
            } else {
                mlp(format!("{p}.mlp"), c.intermediate_size);
            }
        }
        out
    }

    /// The base tensors this model holds, under their checkpoint names (FP8 projections as
    /// `….weight` E4M3 values — U8 bit patterns on a GPU — and `….weight_scale_inv`), each
    /// expert's a view of its layer's stacked weights, a tied lm_head not listed twice: what a
    /// rank's shard holds, for tests and memory accounting.
    pub fn base_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let proj = |out: &mut Vec<(String, Tensor)>, name: &str, w: &BaseWeight| match w {
            BaseWeight::Dense(t) => out.push((format!("{name}.weight"), t.clone())),
            BaseWeight::Fp8 { q, scale_inv } => {
                out.push((format!("{name}.weight"), q.clone()));
                out.push((format!("{name}.weight_scale_inv"), scale_inv.clone()));
            }
        };
        out.push(("model.embed_tokens.weight".to_string(), self.embed.clone()));
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                layer.input_norm.clone(),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                layer.post_norm.clone(),
            ));
            let a = &layer.attn;
            for pr in [&a.q, &a.k, &a.v, &a.o] {
                proj(&mut out, &pr.name, &pr.w);
            }
            out.push((format!("{p}.self_attn.q_norm.weight"), a.q_norm.clone()));
            out.push((format!("{p}.self_attn.k_norm.weight"), a.k_norm.clone()));
            let experts: Vec<&Expert> = match &layer.mlp {
                Mlp::Dense(e) => vec![e],
                Mlp::Moe {
                    experts, router, ..
                } => {
                    proj(&mut out, &format!("{p}.mlp.gate"), router);
                    experts.iter().collect()
                }
            };
            for e in experts {
                for pr in [&e.gate, &e.up, &e.down] {
                    proj(&mut out, &pr.name, &pr.w);
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if !self.config.tie_word_embeddings {
            proj(&mut out, "lm_head", &self.lm_head);
        }
        out
    }

    /// Differentiable mean cross-entropy of predicting token t+1 from position t over labels
    /// that are not −100.
    pub fn loss_tensor(logits: &Tensor, labels: &[i64]) -> candle_core::Result<Tensor> {
        let n = labels[1..].iter().filter(|&&l| l >= 0).count().max(1);
        Self::loss_sum_tensor(logits, labels)? / n as f64
    }

    /// Differentiable sum of the cross-entropies of [`Self::loss_tensor`] (the trainer divides
    /// by the target tokens of the whole optimizer step).
    pub fn loss_sum_tensor(logits: &Tensor, labels: &[i64]) -> candle_core::Result<Tensor> {
        let t = logits.dim(0)?;
        let shifted = logits.narrow(0, 0, t - 1)?;
        let targets: Vec<u32> = labels[1..].iter().map(|&l| l.max(0) as u32).collect();
        let keep: Vec<f32> = labels[1..]
            .iter()
            .map(|&l| f32::from(u8::from(l >= 0)))
            .collect();
        let targets = Tensor::from_vec(targets, (t - 1, 1), logits.device())?;
        let keep = Tensor::from_vec(keep, (t - 1, 1), logits.device())?;
        let max = shifted.max_keepdim(D::Minus1)?.detach();
        let shifted_max = shifted.broadcast_sub(&max)?;
        let lse = shifted_max.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let picked = shifted_max.gather(&targets, 1)?;
        ((lse - picked)? * keep)?.sum_all()
    }

    /// Mean cross-entropy of predicting token t+1 from position t, over labels that are not
    /// −100 (transformers' convention for masked targets).
    pub fn loss(logits: &Tensor, labels: &[i64]) -> candle_core::Result<f32> {
        let logits: Vec<Vec<f32>> = logits.to_vec2()?;
        let (mut sum, mut n) = (0f64, 0usize);
        for (row, &label) in logits.iter().zip(labels.iter().skip(1)) {
            if label < 0 {
                continue;
            }
            sum -= log_softmax_at(row, label as usize);
            n += 1;
        }
        Ok((sum / n.max(1) as f64) as f32)
    }

    /// log p(ids[t] | ids[..t]) for t ≥ 1 from logits `[T, vocab]` of `ids`.
    pub fn token_logprobs(logits: &Tensor, ids: &[u32]) -> candle_core::Result<Vec<f64>> {
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        Ok(rows
            .iter()
            .zip(&ids[1..])
            .map(|(row, &next)| log_softmax_at(row, next as usize))
            .collect())
    }
}

/// log softmax(row)[index], in f64 with the max subtracted for range.
pub fn log_softmax_at(row: &[f32], index: usize) -> f64 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row[index] as f64 - lse
}

// ---------------------------------------------------------------------------------------------
// Pieces of a layer for the parallel trainer (finetune-train's `parallel` module), which runs a
// layer as segments separated by collectives: attention over a range of heads (tensor
// parallel), the router, single experts (expert parallel), the dense MLP. Each piece is the
// same math as `layer_forward`; with the full head range the attention piece equals the
// attention of `layer_forward`.
// ---------------------------------------------------------------------------------------------

/// `project` restricted to output rows `rows` of the whole W (and of LoRA's B): the
/// column-parallel half of a tensor-parallel projection. The model holds W's rows from `held`
/// on (0 for a whole model): a rank's shard holds exactly `rows`, used as they are.
fn project_rows(
    x: &Tensor,
    p: &Proj,
    lora: Option<&Lora>,
    rows: std::ops::Range<usize>,
    held: usize,
    tokens: &Rows<'_>,
) -> candle_core::Result<Tensor> {
    // The frozen product in x's dtype (the compute dtype): `linear` itself when the held rows
    // are the ones asked for (a rank's shard: on a GPU dequantized by the op, not kept).
    let y = if p.w.shape()[0] == rows.len() && held == rows.start {
        linear(x, &p.w)?
    } else {
        let w = p.w.dequantize(x.dtype())?;
        let w = w.narrow(0, rows.start - held, rows.len())?.contiguous()?;
        finetune_kernels::frozen_linear(&x.contiguous()?, &w)?
    };
    match lora.and_then(|l| l.get(&p.name).map(|ab| (l, ab))) {
        Some((l, (a, b))) => {
            // The adapter's path in f32 whatever x's dtype, rounded once (as `project_with`).
            let x = l.dropout_input(&x.to_dtype(DType::F32)?, &p.name, tokens, 0)?;
            // Narrowed views are copied: CUDA's matmul takes only contiguous operands.
            let b = b.narrow(0, rows.start, rows.len())?.contiguous()?;
            let delta = (x.matmul(&a.t()?)?.matmul(&b.t()?)? * l.scale)?;
            let dtype = y.dtype();
            y + delta.to_dtype(dtype)?
        }
        None => Ok(y),
    }
}

/// `project` restricted to input columns `cols` of the whole W (and of LoRA's A), for an input
/// that holds only those columns: the row-parallel half of a tensor-parallel projection, whose
/// results summed over the column ranges give `project` of the whole input (LoRA included:
/// (Σ xᵢAᵢᵀ)Bᵀ = Σ (xᵢAᵢᵀ)Bᵀ). The model holds W's columns from `held` on (as
/// [`project_rows`]).
fn project_cols(
    x: &Tensor,
    p: &Proj,
    lora: Option<&Lora>,
    cols: std::ops::Range<usize>,
    held: usize,
    tokens: &Rows<'_>,
) -> candle_core::Result<Tensor> {
    let y = if p.w.shape()[1] == cols.len() && held == cols.start {
        linear(x, &p.w)?
    } else {
        let w = p.w.dequantize(x.dtype())?;
        let w = w.narrow(1, cols.start - held, cols.len())?.contiguous()?;
        finetune_kernels::frozen_linear(&x.contiguous()?, &w)?
    };
    match lora.and_then(|l| l.get(&p.name).map(|ab| (l, ab))) {
        Some((l, (a, b))) => {
            // x holds features cols of the module's input: their masks.
            let x = l.dropout_input(&x.to_dtype(DType::F32)?, &p.name, tokens, cols.start)?;
            let a = a.narrow(1, cols.start, cols.len())?.contiguous()?;
            let delta = (x.matmul(&a.t()?)?.matmul(&b.t()?)? * l.scale)?;
            let dtype = y.dtype();
            y + delta.to_dtype(dtype)?
        }
        None => Ok(y),
    }
}

impl Qwen3Moe {
    /// Whether layer `index` has a mixture of experts (else a dense MLP).
    pub fn layer_is_moe(&self, index: usize) -> bool {
        matches!(self.layers[index].mlp, Mlp::Moe { .. })
    }

    /// The attention of layer `index` restricted to query heads `heads` (and their key/value
    /// heads: `heads` must cover whole query groups), projected by the matching columns of
    /// o_proj: o_proj's output before the residual, of which the sum over a partition of the
    /// heads is the layer's attention output. `x` is the layer input `[T, hidden]`; no cache.
    /// The model must hold `heads` (a rank's shard holds exactly its heads' rows and columns).
    pub fn attention_heads(
        &self,
        index: usize,
        x: &Tensor,
        ctx: &SequenceContext,
        lora: Option<&Lora>,
        heads: std::ops::Range<usize>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let eps = c.rms_norm_eps;
        let (nh, nkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let group = nh / nkv;
        if heads.start % group != 0 || heads.end % group != 0 || heads.end > nh {
            candle_core::bail!(
                "attention heads {heads:?} do not cover whole groups of {group} query heads per \
                 key/value head ({nh} heads, {nkv} key/value heads)"
            );
        }
        let held = &self.shard.heads;
        if heads.start < held.start || heads.end > held.end {
            candle_core::bail!("attention heads {heads:?}: this model holds heads {held:?}");
        }
        // Where the held rows (q) / columns (o) and key/value rows start in the whole weights.
        let (held_q, held_kv) = (held.start * d, held.start / group * d);
        let kv = heads.start / group..heads.end / group;
        let (lh, lkv) = (heads.len(), kv.len());
        let t = ctx.t;
        // The tables widened to f32 once per sequence, as in layer_forward.
        let (cos, sin) = ctx.rope_tables()?;
        let rope = |x: &Tensor| finetune_kernels::rope(x, cos, sin);
        let layer = &self.layers[index];
        let n = rms_norm(x, &layer.input_norm, eps)?;
        let a = &layer.attn;
        let tokens = ctx.dropout_rows();
        let q = project_rows(
            &n,
            &a.q,
            lora,
            heads.start * d..heads.end * d,
            held_q,
            &tokens,
        )?
        .reshape((t, lh, d))?;
        let k = project_rows(&n, &a.k, lora, kv.start * d..kv.end * d, held_kv, &tokens)?
            .reshape((t, lkv, d))?;
        let v = project_rows(&n, &a.v, lora, kv.start * d..kv.end * d, held_kv, &tokens)?
            .reshape((t, lkv, d))?;
        let q = rope(&rms_norm(&q, &a.q_norm, eps)?)?;
        let k = rope(&rms_norm(&k, &a.k_norm, eps)?)?;
        // The rank's lh query heads over its lkv key/value heads: an ordinary GQA problem.
        let k = k.transpose(0, 1)?.contiguous()?;
        let v = v.transpose(0, 1)?.contiguous()?;
        let attn = self.attend(&q, &k, &v, ctx)?;
        project_cols(
            &attn,
            &a.o,
            lora,
            heads.start * d..heads.end * d,
            held_q,
            &tokens,
        )
    }

    /// The MLP input of layer `index`: post-attention RMSNorm of `h` (input + attention).
    pub fn post_attention_norm(&self, index: usize, h: &Tensor) -> candle_core::Result<Tensor> {
        rms_norm(h, &self.layers[index].post_norm, self.config.rms_norm_eps)
    }

    /// The router on MLP inputs `x` `[T, hidden]`: logits in the compute dtype, softmax in f32
    /// (transformers), each token's top-k experts (the choice itself has no gradient, as in
    /// torch.topk; ties to the lower index, as torch.topk on CPU), their probabilities
    /// renormalised when `norm_topk_prob`: the combine weights `[T, experts]` in x's dtype (zero
    /// off the top-k) and, per expert, its tokens in token order.
    fn route_tokens(
        &self,
        x: &Tensor,
        router: &BaseWeight,
        n_exp: usize,
    ) -> candle_core::Result<(Tensor, Vec<Vec<u32>>)> {
        let c = &self.config;
        let probs = softmax_last(&linear(x, router)?.to_dtype(DType::F32)?)?; // [T, E]
                                                                              // Each token's top-k on the probabilities' device (finetune_kernels::moe_route): only
                                                                              // the T·k chosen indices come to the host, the 0/1 mask stays where the weights are.
        let top = finetune_kernels::moe_route::top_k(&probs, c.num_experts_per_tok)?;
        let mut routed: Vec<Vec<u32>> = vec![Vec::new(); n_exp];
        for (tok, picks) in top.chosen()?.iter().enumerate() {
            for &e in picks {
                routed[e as usize].push(tok as u32);
            }
        }
        let mut weights = (probs * top.mask()?)?;
        if c.norm_topk_prob {
            weights = weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?;
        }
        Ok((weights.to_dtype(x.dtype())?, routed))
    }

    /// The router of MoE layer `index` on MLP inputs `x` `[T, hidden]`: the combine weights
    /// `[T, experts]` (differentiable in `x`, zero off each token's top-k, renormalised when
    /// `norm_topk_prob`) and, per expert, the tokens routed to it in token order — as the
    /// routing inside `layer_forward`.
    pub fn route(&self, index: usize, x: &Tensor) -> candle_core::Result<(Tensor, Vec<Vec<u32>>)> {
        let Mlp::Moe { router, .. } = &self.layers[index].mlp else {
            candle_core::bail!("layer {index} has a dense MLP, not experts");
        };
        // The router is whole on every shard: all experts' logits.
        self.route_tokens(x, router, self.config.num_experts)
    }

    /// Expert `expert` (global index) of MoE layer `index` (a SwiGLU with its LoRA adapters)
    /// on rows `x` (tokens `rows`, for the dropout masks); the model must hold it (a rank's
    /// shard holds its experts only).
    pub fn expert_forward(
        &self,
        index: usize,
        expert: usize,
        x: &Tensor,
        lora: Option<&Lora>,
        rows: &Rows<'_>,
    ) -> candle_core::Result<Tensor> {
        self.held_expert(index, expert)?.forward(x, lora, rows)
    }

    /// Expert `expert` (global index) of MoE layer `index`, if this model holds it.
    fn held_expert(&self, index: usize, expert: usize) -> candle_core::Result<&Expert> {
        let Mlp::Moe { experts, .. } = &self.layers[index].mlp else {
            candle_core::bail!("layer {index} has a dense MLP, not experts");
        };
        let held = &self.shard.experts;
        if !held.contains(&expert) {
            candle_core::bail!(
                "expert {expert} of layer {index}: this model holds experts {held:?}"
            );
        }
        Ok(&experts[expert - held.start])
    }

    /// The adapters (gate, up, down) of experts `range` of MoE layer `index` for a forward that
    /// runs those marked `used` (indexed from `range.start`), for
    /// [`Self::expert_forward_with`]: slices whose gradients reach the layer's stacked adapters
    /// as one tensor per stack when the adapter holds exactly these experts stacked (an
    /// expert-parallel rank's local experts), else each expert's views. Every used expert must
    /// then run and take part in the backward.
    pub fn expert_adapters(
        &self,
        index: usize,
        range: std::ops::Range<usize>,
        used: &[bool],
        lora: Option<&Lora>,
    ) -> candle_core::Result<Vec<ExpertLora>> {
        let Mlp::Moe { experts, .. } = &self.layers[index].mlp else {
            candle_core::bail!("layer {index} has a dense MLP, not experts");
        };
        // This model may hold a shard of the experts (`self.shard.experts`).
        let held = &self.shard.experts;
        if range.start < held.start || range.end > held.end {
            candle_core::bail!(
                "experts {range:?} of layer {index}: this model holds experts {held:?}"
            );
        }
        let local = range.start - held.start..range.end - held.start;
        let Some(experts) = experts.get(local) else {
            candle_core::bail!(
                "experts {range:?} of layer {index}: it has {}",
                experts.len()
            );
        };
        expert_adapters(experts, used, lora)
    }

    /// [`Self::expert_forward`] with the expert's adapters given (from
    /// [`Self::expert_adapters`]).
    pub fn expert_forward_with(
        &self,
        index: usize,
        expert: usize,
        x: &Tensor,
        lora: Option<&Lora>,
        adapters: ExpertLora,
        rows: &Rows<'_>,
    ) -> candle_core::Result<Tensor> {
        self.held_expert(index, expert)?
            .forward_with(x, lora, adapters, rows)
    }

    /// The dense MLP of layer `index` on `x` (layers in `mlp_only_layers`), x's rows being the
    /// tokens `rows`.
    pub fn dense_mlp(
        &self,
        index: usize,
        x: &Tensor,
        lora: Option<&Lora>,
        rows: &Rows<'_>,
    ) -> candle_core::Result<Tensor> {
        let Mlp::Dense(e) = &self.layers[index].mlp else {
            candle_core::bail!("layer {index} has experts, not a dense MLP");
        };
        e.forward(x, lora, rows)
    }
}

/// Full-parameter training (`finetune pretrain`): every weight of the model as a trainable f32
/// [`Var`].
impl Qwen3Moe {
    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Turns every weight into an f32 `Var` (its gradient flows through candle's own ops:
    /// `linear` takes the matmul path for variables) and returns them with their checkpoint
    /// names, in [`crate::init::tensor_shapes`] order. With tied embeddings `lm_head` is the
    /// embedding's own variable. FP8 weights are dequantized.
    pub fn make_trainable(&mut self) -> candle_core::Result<Vec<(String, Var)>> {
        self.require_whole("full-parameter training")?;
        self.require_whole_vocab("full-parameter training")?;
        // The batched MoE path reads the stacked copies, which stay frozen.
        self.moe_path = MoePath::PerExpert;
        fn var(t: &Tensor) -> candle_core::Result<(Var, Tensor)> {
            let v = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            let t = v.as_tensor().clone();
            Ok((v, t))
        }
        fn proj(w: &mut BaseWeight) -> candle_core::Result<Var> {
            let (v, t) = var(&w.dequantize(DType::F32)?)?;
            *w = BaseWeight::Dense(t);
            Ok(v)
        }
        let mut out = Vec::new();
        let (v, t) = var(&self.embed)?;
        self.embed = t;
        out.push(("model.embed_tokens.weight".to_string(), v));
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let (v, t) = var(&layer.input_norm)?;
            layer.input_norm = t;
            out.push((format!("{p}.input_layernorm.weight"), v));
            let (v, t) = var(&layer.post_norm)?;
            layer.post_norm = t;
            out.push((format!("{p}.post_attention_layernorm.weight"), v));
            let a = &mut layer.attn;
            for pr in [&mut a.q, &mut a.k, &mut a.v, &mut a.o] {
                out.push((format!("{}.weight", pr.name), proj(&mut pr.w)?));
            }
            let (v, t) = var(&a.q_norm)?;
            a.q_norm = t;
            out.push((format!("{p}.self_attn.q_norm.weight"), v));
            let (v, t) = var(&a.k_norm)?;
            a.k_norm = t;
            out.push((format!("{p}.self_attn.k_norm.weight"), v));
            let experts: Vec<&mut Expert> = match &mut layer.mlp {
                Mlp::Dense(e) => vec![e],
                Mlp::Moe { experts, .. } => experts.iter_mut().collect(),
            };
            for e in experts {
                for pr in [&mut e.gate, &mut e.up, &mut e.down] {
                    out.push((format!("{}.weight", pr.name), proj(&mut pr.w)?));
                }
            }
            if let Mlp::Moe { router, .. } = &mut layer.mlp {
                out.push((format!("{p}.mlp.gate.weight"), proj(router)?));
            }
        }
        let (v, t) = var(&self.norm)?;
        self.norm = t;
        out.push(("model.norm.weight".to_string(), v));
        if self.config.tie_word_embeddings {
            self.lm_head = BaseWeight::Dense(self.embed.clone());
        } else {
            out.push(("lm_head.weight".to_string(), proj(&mut self.lm_head)?));
        }
        Ok(out)
    }
}
