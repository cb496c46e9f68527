//! The `repo-heldout` suite: the mined held-out pairs of the repository itself.
//!
//! Per pair: the teacher-forced cross-entropy of the real target given the prompt (summed over
//! target tokens; the suite's loss is Σ loss / Σ tokens and its perplexity e^loss), and, when
//! generating, the model's own edit for the prompt scored by [`crate::edits`]: applies cleanly
//! to the files as they were before the commit, exact match, similarity to the real target.

use crate::edits;
use crate::generate::{GenerationParams, Generator};
use crate::EvalError;
use finetune_data::{encode_pairs, prompt_ids, OverLength, PairText, Template};
use finetune_model::{Lora, Qwen3Moe};
use std::path::Path;
use tokenizers::Tokenizer;

/// Teacher-forced loss of one pair.
#[derive(Debug, Clone, PartialEq)]
pub struct LossScore {
    pub id: String,
    pub loss_sum: f64,
    pub target_tokens: usize,
}

impl LossScore {
    /// Mean cross-entropy over the pair's target tokens.
    pub fn mean(&self) -> f64 {
        self.loss_sum / self.target_tokens.max(1) as f64
    }
}

/// One generated edit and its scores.
#[derive(Debug, Clone, PartialEq)]
pub struct EditScore {
    pub id: String,
    pub generated: String,
    /// `None` when the pre-change files could not be read (no repository at hand).
    pub applies: Option<bool>,
    pub exact: bool,
    pub similarity: f64,
}

/// Teacher-forced losses of `pairs` (at most `seq_len` tokens each, context cut to fit).
pub fn teacher_forced(
    model: &Qwen3Moe,
    lora: Option<&Lora>,
    pairs: &[PairText],
    tokenizer: &Tokenizer,
    template: Template,
    seq_len: usize,
) -> Result<Vec<LossScore>, EvalError> {
    if let Some(l) = lora {
        l.set_training(false);
    }
    let mut out = Vec::new();
    for pair in pairs {
        let (ex, _) = encode_pairs(
            std::slice::from_ref(pair),
            tokenizer,
            template,
            seq_len,
            OverLength::TruncateTarget,
        )
        .map_err(|e| EvalError::Invalid(e.to_string()))?;
        let Some(ex) = ex.into_iter().next() else {
            continue;
        };
        let pos: Vec<u32> = (0..ex.ids.len() as u32).collect();
        let logits = model.forward_with(&ex.ids, &pos, lora)?.detach();
        let loss = Qwen3Moe::loss_sum_tensor(&logits, &ex.labels)?.to_scalar::<f32>()? as f64;
        out.push(LossScore {
            id: pair.id.clone(),
            loss_sum: loss,
            target_tokens: ex.labels[1..].iter().filter(|&&l| l >= 0).count(),
        });
    }
    Ok(out)
}

/// The prompts the generator completes: each pair's rendered prompt in at most
/// `seq_len − max_new_tokens` tokens (pairs whose template alone is longer are left out).
pub fn prompts(
    pairs: &[PairText],
    tokenizer: &Tokenizer,
    template: Template,
    budget: usize,
) -> Result<Vec<(usize, String)>, EvalError> {
    let mut out = Vec::new();
    for (i, pair) in pairs.iter().enumerate() {
        let Some(ids) = prompt_ids(pair, tokenizer, template, budget)
            .map_err(|e| EvalError::Invalid(e.to_string()))?
        else {
            continue;
        };
        let text = tokenizer
            .decode(&ids, false)
            .map_err(|e| EvalError::Generation(e.to_string()))?;
        out.push((i, text));
    }
    Ok(out)
}

/// Generates an edit for every prompt and scores it against its pair (`repo`: the mined
/// repository, to read the files before each commit).
pub fn generated_edits(
    generator: &dyn Generator,
    pairs: &[PairText],
    prompts: &[(usize, String)],
    params: &GenerationParams,
    repo: Option<&Path>,
) -> Result<Vec<EditScore>, EvalError> {
    let texts: Vec<String> = prompts.iter().map(|(_, p)| p.clone()).collect();
    let generated = generator.generate_all(&texts, params);
    let mut out = Vec::new();
    for ((i, _), g) in prompts.iter().zip(generated) {
        let pair = &pairs[*i];
        let g = g?;
        let applies = match (repo, pair.meta.commits.first()) {
            (Some(repo), Some(commit)) => {
                let files = edits::files_at(repo, &format!("{commit}^"), &pair.meta.files)?;
                Some(edits::applies_cleanly(&g, &pair.format, &files)?)
            }
            _ => None,
        };
        out.push(EditScore {
            id: pair.id.clone(),
            exact: edits::exact_match(&g, &pair.target),
            similarity: edits::similarity(&g, &pair.target),
            applies,
            generated: g,
        });
    }
    Ok(out)
}
