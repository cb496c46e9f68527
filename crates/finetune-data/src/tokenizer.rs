//! The tokenizer: a model's own `tokenizer.json`, or a byte-level BPE trained on the mined
//! text for the embedded `tiny` base.
//!
//! A trained tokenizer carries the special tokens of Qwen's chat format (`<|endoftext|>`,
//! `<|im_start|>`, `<|im_end|>`) with the first ids, so the same chat template renders pairs
//! for the tiny base as for Qwen3-Coder. Byte-level means every string round-trips: no unknown
//! token, whatever the repository holds.

use crate::DataError;
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

/// Special tokens of Qwen's chat format, in id order for a trained tokenizer.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Loads `tokenizer.json` and checks that its ids fit a model with `vocab_size` embeddings.
pub fn load_tokenizer(path: &Path, vocab_size: usize) -> Result<Tokenizer, DataError> {
    let tokenizer = Tokenizer::from_file(path).map_err(|e| DataError::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let have = tokenizer.get_vocab_size(true);
    if have > vocab_size {
        return Err(DataError::Tokenizer {
            path: path.to_path_buf(),
            message: format!(
                "{have} tokens, but the model has only {vocab_size} embeddings (config.json vocab_size)"
            ),
        });
    }
    Ok(tokenizer)
}

/// Trains a byte-level BPE of at most `vocab_size` tokens (special tokens included) on
/// `texts` and writes it to `out` atomically (temp file + rename). Deterministic: the same
/// texts give the same file.
pub fn train_byte_level_bpe<I, S>(
    texts: I,
    vocab_size: usize,
    out: &Path,
) -> Result<Tokenizer, DataError>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let err = |message: String| DataError::Tokenizer {
        path: out.to_path_buf(),
        message,
    };
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(None::<tokenizers::PostProcessorWrapper>)
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(|e| err(e.to_string()))?;
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| err(format!("training the BPE failed: {e}")))?;
    let mut tokenizer: Tokenizer = tokenizer.into();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| err(e.to_string()))?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    let tmp = out.with_extension("json.tmp");
    tokenizer
        .save(&tmp, false)
        .map_err(|e| err(format!("writing failed: {e}")))?;
    std::fs::rename(&tmp, out).map_err(|e| err(e.to_string()))?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        (0..200)
            .map(|i| {
                format!(
                    "fn add_{i}(a: u32, b: u32) -> u32 {{\n    a + b * {i}\n}}\n// naïve ✓ {i}\n"
                )
            })
            .collect()
    }

    #[test]
    fn trained_bpe_round_trips_any_text_and_keeps_special_ids_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let tok = train_byte_level_bpe(corpus().iter(), 400, &path).unwrap();
        assert!(tok.get_vocab_size(true) <= 400);
        for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_to_id(s), Some(i as u32), "{s}");
        }
        let loaded = load_tokenizer(&path, 400).unwrap();
        for text in [
            "fn add_7(a: u32)",
            "never seen: Ωμέγα \u{1F600}\ttabs\n\n",
            "  x",
        ] {
            let ids = loaded.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(loaded.decode(&ids, false).unwrap(), text);
        }
        // Merges were learned: a frequent word is fewer tokens than bytes.
        let n = loaded.encode("fn add_", false).unwrap().get_ids().len();
        assert!(n < "fn add_".len(), "{n} tokens");
        // Special tokens are single ids in text.
        let ids = loaded
            .encode("<|im_start|>user", false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids[0], 1);
        // Same corpus, same file.
        let again = dir.path().join("again.json");
        train_byte_level_bpe(corpus().iter(), 400, &again).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&again).unwrap()
        );
    }

    #[test]
    fn tokenizer_larger_than_the_model_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        train_byte_level_bpe(corpus().iter(), 400, &path).unwrap();
        let e = load_tokenizer(&path, 100).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("100 embeddings"),
            "{e}"
        );
        let e = load_tokenizer(&dir.path().join("missing.json"), 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.json"), "{e}");
    }
}
