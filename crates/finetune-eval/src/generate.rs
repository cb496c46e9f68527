//! The interface every way of generating text implements: the built-in sampler on our model
//! ([`crate::sampler`]) and an OpenAI-compatible endpoint ([`crate::endpoint`]).

use crate::EvalError;

/// How to generate one completion.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// Most tokens generated after the prompt.
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off).
    pub top_p: f64,
    /// Generation stops before the first occurrence of any of these (not included in the
    /// result).
    pub stop: Vec<String>,
    /// Seed of the sampling RNG (sample i of a prompt uses seed + i).
    pub seed: u64,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            stop: Vec::new(),
            seed: 0,
        }
    }
}

/// Something that completes prompts.
pub trait Generator: Sync {
    /// A short description for reports (e.g. `tiny+adapter`, `http://127.0.0.1:8000 model=x`).
    fn describe(&self) -> String;

    /// The completion of `prompt` (without the prompt), cut before the first stop sequence.
    fn generate(&self, prompt: &str, params: &GenerationParams) -> Result<String, EvalError>;

    /// Completions of many prompts, in order; implementations may run them concurrently.
    fn generate_all(
        &self,
        prompts: &[String],
        params: &GenerationParams,
    ) -> Vec<Result<String, EvalError>> {
        prompts.iter().map(|p| self.generate(p, params)).collect()
    }
}

/// `text` cut before the earliest occurrence of any stop sequence.
pub fn cut_at_stop<'a>(text: &'a str, stop: &[String]) -> &'a str {
    let end = stop
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
        .unwrap_or(text.len());
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_at_the_earliest_stop() {
        let stop = vec!["\ndef ".to_string(), "<|im_end|>".to_string()];
        assert_eq!(
            cut_at_stop("  return 1\ndef g():<|im_end|>", &stop),
            "  return 1"
        );
        assert_eq!(cut_at_stop("x<|im_end|>\ndef ", &stop), "x");
        assert_eq!(cut_at_stop("no stop", &stop), "no stop");
    }
}
