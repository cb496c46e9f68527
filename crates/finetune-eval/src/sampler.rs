//! The built-in sampler: generation on our own model (base, or base + LoRA) with a KV cache.
//!
//! The prompt is run once through [`Qwen3Moe::forward_cached`], then one token at a time.
//! Next token from the last logits row ℓ: greedy argmax (temperature 0; ties to the lower id),
//! or sampling from softmax(ℓ / T) restricted to the nucleus — the smallest set of most likely
//! tokens whose probability reaches `top_p` — renormalised, drawn from a ChaCha8 stream seeded
//! with `params.seed`. Generation ends at an end-of-turn token (`<|im_end|>`, `<|endoftext|>`),
//! before the first stop sequence, or after `max_new_tokens`.

use crate::generate::{cut_at_stop, GenerationParams, Generator};
use crate::EvalError;
use finetune_model::{Lora, Qwen3Moe};
use rand::{Rng, SeedableRng};
use tokenizers::Tokenizer;

/// Our model as a [`Generator`].
pub struct ModelGenerator<'a> {
    pub model: &'a Qwen3Moe,
    pub lora: Option<&'a Lora>,
    pub tokenizer: &'a Tokenizer,
    /// For reports, e.g. `base` or `base+adapter`.
    pub name: String,
}

/// The next token from logits `row` (see the module doc).
pub fn pick_token(row: &[f32], temperature: f64, top_p: f64, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        row.iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = row
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, ((v as f64 - max) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0;
    let mut mass = 0.0;
    for (_, p) in &probs {
        mass += p / total;
        kept += 1;
        if mass >= top_p {
            break;
        }
    }
    let nucleus = &probs[..kept];
    let nucleus_total: f64 = nucleus.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f64>() * nucleus_total;
    for (id, p) in nucleus {
        if u < *p {
            return *id;
        }
        u -= p;
    }
    nucleus[kept - 1].0
}

impl ModelGenerator<'_> {
    /// Generated token ids for prompt ids (without the prompt), and whether a stop ended it.
    pub fn generate_ids(
        &self,
        prompt: &[u32],
        params: &GenerationParams,
    ) -> Result<Vec<u32>, EvalError> {
        if prompt.is_empty() {
            return Err(EvalError::Invalid("empty prompt".into()));
        }
        let room = self
            .model
            .config
            .max_position_embeddings
            .saturating_sub(prompt.len());
        let max_new = params.max_new_tokens.min(room);
        let end_ids: Vec<u32> = ["<|im_end|>", "<|endoftext|>"]
            .iter()
            .filter_map(|t| self.tokenizer.token_to_id(t))
            .collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(params.seed);
        let mut cache = self.model.new_cache();
        let mut logits = self.model.forward_cached(prompt, &mut cache, self.lora)?;
        let mut out = Vec::new();
        while out.len() < max_new {
            let last = logits.get(logits.dim(0)? - 1)?.detach().to_vec1::<f32>()?;
            let next = pick_token(&last, params.temperature, params.top_p, &mut rng);
            if end_ids.contains(&next) {
                break;
            }
            out.push(next);
            if !params.stop.is_empty() {
                let text = self.decode(&out)?;
                if cut_at_stop(&text, &params.stop).len() < text.len() {
                    break;
                }
            }
            logits = self.model.forward_cached(&[next], &mut cache, self.lora)?;
        }
        Ok(out)
    }

    fn decode(&self, ids: &[u32]) -> Result<String, EvalError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| EvalError::Generation(e.to_string()))
    }
}

impl Generator for ModelGenerator<'_> {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn generate(&self, prompt: &str, params: &GenerationParams) -> Result<String, EvalError> {
        let ids = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| EvalError::Generation(e.to_string()))?
            .get_ids()
            .to_vec();
        let out = self.generate_ids(&ids, params)?;
        let text = self.decode(&out)?;
        Ok(cut_at_stop(&text, &params.stop).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use finetune_model::{Qwen3MoeConfig, Weights};
    use std::path::Path;

    fn fixture() -> (Qwen3Moe, Tokenizer) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../datasets/fixtures/tiny-qwen3-moe/bf16");
        let config = Qwen3MoeConfig::from_file(&dir.join("config.json")).unwrap();
        let weights = Weights::open(&dir, &Device::Cpu).unwrap();
        let model = Qwen3Moe::load(config, &weights, &Device::Cpu).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let texts: Vec<String> = (0..40)
            .map(|i| format!("def f{i}(x):\n    return x + {i}\n"))
            .collect();
        let tok =
            finetune_data::train_byte_level_bpe(texts.iter(), 300, &tmp.path().join("t.json"))
                .unwrap();
        (model, tok)
    }

    /// Greedy generation with the KV cache picks, at every step, the argmax of a full forward
    /// over the prompt and the tokens generated so far.
    #[test]
    fn greedy_with_cache_equals_argmax_of_full_forwards() {
        let (model, tok) = fixture();
        let g = ModelGenerator {
            model: &model,
            lora: None,
            tokenizer: &tok,
            name: "base".into(),
        };
        let prompt: Vec<u32> = vec![5, 17, 42, 99, 7];
        let params = GenerationParams {
            max_new_tokens: 12,
            ..Default::default()
        };
        let out = g.generate_ids(&prompt, &params).unwrap();
        assert!(!out.is_empty());
        let mut seq = prompt.clone();
        for &next in &out {
            let pos: Vec<u32> = (0..seq.len() as u32).collect();
            let logits = model.forward(&seq, &pos).unwrap();
            let last = logits.get(seq.len() - 1).unwrap().to_vec1::<f32>().unwrap();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
            assert_eq!(next, pick_token(&last, 0.0, 1.0, &mut rng));
            seq.push(next);
        }
    }

    #[test]
    fn sampling_is_seeded_and_top_p_narrows_to_the_nucleus() {
        let row = [2.0f32, 1.0, 0.5, -1.0, 3.0];
        let draw = |seed: u64, t: f64, p: f64| -> Vec<u32> {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            (0..200).map(|_| pick_token(&row, t, p, &mut rng)).collect()
        };
        assert_eq!(draw(1, 1.0, 1.0), draw(1, 1.0, 1.0));
        assert_ne!(draw(1, 1.0, 1.0), draw(2, 1.0, 1.0));
        // Greedy and a tiny nucleus both give the argmax (id 4).
        assert!(draw(1, 0.0, 1.0).iter().all(|&t| t == 4));
        assert!(draw(1, 1.0, 0.01).iter().all(|&t| t == 4));
        // top_p = 0.8: softmax = [.23 .085 .05 .01 .63] → nucleus {4, 0} (0.86).
        let d = draw(3, 1.0, 0.8);
        assert!(
            d.iter().all(|&t| t == 4 || t == 0) && d.contains(&0),
            "{d:?}"
        );
        // Full distribution: frequencies follow softmax within sampling error.
        let d = draw(4, 1.0, 1.0);
        let share = d.iter().filter(|&&t| t == 4).count() as f64 / d.len() as f64;
        assert!((share - 0.63).abs() < 0.1, "{share}");
    }

    #[test]
    fn stop_sequences_end_generation_and_are_cut() {
        let (model, tok) = fixture();
        let g = ModelGenerator {
            model: &model,
            lora: None,
            tokenizer: &tok,
            name: "base".into(),
        };
        let params = GenerationParams {
            max_new_tokens: 40,
            ..Default::default()
        };
        let free = g.generate("def f1(x):\n", &params).unwrap();
        assert!(free.chars().count() >= 3, "{free:?}");
        // Stop at the third character of the free-running output.
        let stop: String = free.chars().skip(2).take(1).collect();
        let cut = g
            .generate(
                "def f1(x):\n",
                &GenerationParams {
                    stop: vec![stop.clone()],
                    ..params
                },
            )
            .unwrap();
        assert!(
            !cut.contains(&stop) && free.starts_with(&cut),
            "{cut:?} vs {free:?}"
        );
    }
}
