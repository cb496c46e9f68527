//! The Qwen3-MoE forward pass in plain candle ops (f32), the reference implementation that the
//! fused kernels will be tested against.
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

use crate::config::Qwen3MoeConfig;
use crate::lora::Lora;
use crate::weights::{BaseWeight, Weights, WeightsError};
use candle_core::{DType, Device, Tensor, Var, D};

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
    },
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
    mask: Tensor,
    cos: Tensor,
    sin: Tensor,
}

/// A loaded Qwen3-MoE model (base weights only).
pub struct Qwen3Moe {
    pub config: Qwen3MoeConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: BaseWeight,
    device: Device,
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
    finetune_kernels::frozen_linear(&x.contiguous()?, &w.dequantize(DType::F32)?)
}

/// y = x·Wᵀ, plus s·(x·Aᵀ)·Bᵀ when the projection has an adapter.
fn project(x: &Tensor, p: &Proj, lora: Option<&Lora>) -> candle_core::Result<Tensor> {
    let y = linear(x, &p.w)?;
    match lora.and_then(|l| l.get(&p.name).map(|ab| (l, ab))) {
        Some((l, (a, b))) => {
            let x = l.dropout_input(x)?;
            y + (x.matmul(&a.t()?)?.matmul(&b.t()?)? * l.scale)?
        }
        None => Ok(y),
    }
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(&w.to_dtype(DType::F32)?)
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

impl Expert {
    fn forward(&self, x: &Tensor, lora: Option<&Lora>) -> candle_core::Result<Tensor> {
        let g = silu(&project(x, &self.gate, lora)?)?;
        project(&(g * project(x, &self.up, lora)?)?, &self.down, lora)
    }
}

impl Qwen3Moe {
    /// Loads the weights of `config` from `weights`; every tensor must be there with its
    /// shape, and no tensor may be left over.
    pub fn load(config: Qwen3MoeConfig, weights: &Weights, device: &Device) -> Result<Self> {
        let c = &config;
        let (h, d) = (c.hidden_size, c.head_dim());
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let embed = weights.tensor("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let proj = |name: String, out: usize, inp: usize| -> Result<Proj> {
                Ok(Proj {
                    w: weights.base_weight(&name, out, inp)?,
                    name,
                })
            };
            let attn = Attention {
                q: proj(format!("{p}.self_attn.q_proj"), nh * d, h)?,
                k: proj(format!("{p}.self_attn.k_proj"), nkv * d, h)?,
                v: proj(format!("{p}.self_attn.v_proj"), nkv * d, h)?,
                o: proj(format!("{p}.self_attn.o_proj"), h, nh * d)?,
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
                Mlp::Moe {
                    router: weights.base_weight(&format!("{p}.mlp.gate"), c.num_experts, h)?,
                    experts: (0..c.num_experts)
                        .map(|e| expert(&format!("{p}.mlp.experts.{e}"), c.moe_intermediate_size))
                        .collect::<Result<_>>()?,
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
            weights.base_weight("lm_head", c.vocab_size, h)?
        };
        weights.check_all_used()?;
        Ok(Self {
            config,
            embed,
            layers,
            norm,
            lm_head,
            device: device.clone(),
        })
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

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Embeddings `[T, hidden]` (f32) of `input_ids`; the embedding is frozen.
    pub fn embed_tokens(&self, input_ids: &[u32]) -> candle_core::Result<Tensor> {
        let ids = Tensor::new(input_ids, &self.device)?;
        self.embed.to_dtype(DType::F32)?.index_select(&ids, 0)
    }

    /// Final norm and lm_head: logits `[T, vocab]` of hidden states `[T, hidden]`.
    pub fn head(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = rms_norm(x, &self.norm, self.config.rms_norm_eps)?;
        linear(&x, &self.lm_head)
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
        // Document of each token, and the additive mask: 0 where attention is allowed.
        let mut doc = Vec::with_capacity(t);
        for (i, &p) in position_ids.iter().enumerate() {
            let prev = if i == 0 { 0 } else { doc[i - 1] };
            doc.push(if i > 0 && p <= position_ids[i - 1] && p == 0 {
                prev + 1
            } else {
                prev
            });
        }
        // Keys are the `past` cached tokens (all of the same document) followed by these.
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                let doc = &doc;
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
        let mask = Tensor::from_vec(mask, (1, t, past + t), &self.device)?;

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
        let cos = Tensor::from_vec(cos, (t, 1, d), &self.device)?;
        let sin = Tensor::from_vec(sin, (t, 1, d), &self.device)?;
        Ok(SequenceContext {
            t,
            past,
            mask,
            cos,
            sin,
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
        let c = &self.config;
        let eps = c.rms_norm_eps;
        let (nh, nkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let (t, past) = (ctx.t, ctx.past);
        let half = d / 2;
        let rope = |x: &Tensor| -> candle_core::Result<Tensor> {
            let x1 = x.narrow(D::Minus1, 0, half)?;
            let x2 = x.narrow(D::Minus1, half, half)?;
            let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
            x.broadcast_mul(&ctx.cos)? + rotated.broadcast_mul(&ctx.sin)?
        };
        let layer = &self.layers[index];
        // Attention.
        let n = rms_norm(x, &layer.input_norm, eps)?;
        let a = &layer.attn;
        let q = project(&n, &a.q, lora)?.reshape((t, nh, d))?;
        let k = project(&n, &a.k, lora)?.reshape((t, nkv, d))?;
        let v = project(&n, &a.v, lora)?.reshape((t, nkv, d))?;
        let q = rope(&rms_norm(&q, &a.q_norm, eps)?)?;
        let k = rope(&rms_norm(&k, &a.k_norm, eps)?)?;
        // [kv heads, T, d], after the cached keys/values of this layer.
        let mut k = k.transpose(0, 1)?.contiguous()?;
        let mut v = v.transpose(0, 1)?.contiguous()?;
        if let Some(cache) = cache {
            if let Some((pk, pv)) = &cache.layers[index] {
                k = Tensor::cat(&[pk, &k], 1)?;
                v = Tensor::cat(&[pv, &v], 1)?;
            }
            cache.layers[index] = Some((k.clone(), v.clone()));
        }
        let keys = past + t;
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
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(&ctx.mask)?;
        let attn = softmax_last(&scores)?.matmul(&v)?; // [nh, T, d]
        let attn = attn.transpose(0, 1)?.reshape((t, nh * d))?;
        let x = (x + project(&attn, &a.o, lora)?)?;

        // MLP.
        let n = rms_norm(&x, &layer.post_norm, eps)?;
        let y = match &layer.mlp {
            Mlp::Dense(e) => e.forward(&n, lora)?,
            Mlp::Moe { router, experts } => self.moe(&n, router, experts, lora)?,
        };
        x + y
    }

    fn moe(
        &self,
        x: &Tensor,
        router: &BaseWeight,
        experts: &[Expert],
        lora: Option<&Lora>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let probs = softmax_last(&linear(x, router)?)?; // [T, E], differentiable in x
        let values: Vec<Vec<f32>> = probs.to_vec2()?;
        // Top-k experts of each token (the choice itself has no gradient, as in torch.topk).
        let (t, n_exp) = (values.len(), experts.len());
        let mut chosen = vec![0f32; t * n_exp];
        let mut routed: Vec<Vec<u32>> = vec![Vec::new(); n_exp];
        for (tok, p) in values.iter().enumerate() {
            let mut order: Vec<usize> = (0..p.len()).collect();
            // Ties broken by the lower index, as torch.topk does on CPU.
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            for &e in &order[..c.num_experts_per_tok] {
                chosen[tok * n_exp + e] = 1.0;
                routed[e].push(tok as u32);
            }
        }
        let chosen = Tensor::from_vec(chosen, (t, n_exp), &self.device)?;
        let mut weights = (probs * chosen)?;
        if c.norm_topk_prob {
            weights = weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?;
        }
        let mut out = x.zeros_like()?;
        for (e, toks) in routed.iter().enumerate() {
            if toks.is_empty() {
                continue;
            }
            let idx = Tensor::new(toks.as_slice(), &self.device)?;
            let w = weights.index_select(&idx, 0)?.narrow(1, e, 1)?;
            let y = experts[e]
                .forward(&x.index_select(&idx, 0)?, lora)?
                .broadcast_mul(&w)?;
            out = out.index_add(&idx, &y, 0)?;
        }
        Ok(out)
    }

    /// The projections LoRA can adapt, with their `[out, in]` shapes, in model order.
    pub fn lora_targets(&self) -> Vec<(String, usize, usize)> {
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
