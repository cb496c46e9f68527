//! Pairs → token ids with a loss mask.
//!
//! A pair (instruction, context, target) becomes a prompt and a target. With a chat tokenizer
//! (one that has `<|im_start|>`/`<|im_end|>`, as Qwen3-Coder's and our trained one do) the
//! prompt is Qwen's ChatML:
//!
//! ```text
//! <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{instruction}\n\n{context}<|im_end|>\n<|im_start|>assistant\n
//! ```
//! and the target is `{target}<|im_end|>\n`; otherwise a plain template (`{instruction}\n\n
//! {context}\n\n### Edit\n` then `{target}` and the end-of-text token). Labels are the token ids
//! on the target and −100 on the prompt (transformers' convention), so the loss falls on target
//! tokens only.
//!
//! Over-long examples (prompt + target > the sequence length) are truncated or dropped by
//! policy: truncation cuts the context (never the instruction, the target or the template),
//! and drops the example when even that cannot fit. Every outcome is counted.

use crate::DataError;
use serde::Deserialize;
use std::path::Path;
use tokenizers::Tokenizer;

/// The fields of a mined pair (`train.jsonl`, `heldout.jsonl`) that rendering needs.
#[derive(Debug, Clone, Deserialize)]
pub struct PairText {
    pub id: String,
    pub instruction: String,
    pub context: String,
    pub target: String,
    /// `search-replace` or `udiff`.
    pub format: String,
    /// Where the change comes from (absent in hand-written pairs).
    #[serde(default)]
    pub meta: PairMeta,
}

/// The part of a mined pair's `meta` that evaluation needs.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PairMeta {
    /// The commit of the change (the first is the one on the mined history).
    #[serde(default)]
    pub commits: Vec<String>,
    /// Files the change touches.
    #[serde(default)]
    pub files: Vec<String>,
}

/// Reads a pairs JSONL file; a bad line fails with the file and line number.
pub fn read_pairs(path: &Path) -> Result<Vec<PairText>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| DataError::BadPair {
                path: path.to_path_buf(),
                line: i + 1,
                message: e.to_string(),
            })
        })
        .collect()
}

/// Which template renders pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// Qwen's `<|im_start|>role … <|im_end|>` chat format.
    ChatMl,
    /// Prompt, an `### Edit` header, target, end-of-text.
    Plain,
}

impl Template {
    /// ChatML when the tokenizer knows its special tokens, plain otherwise.
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> Self {
        if tokenizer.token_to_id("<|im_start|>").is_some()
            && tokenizer.token_to_id("<|im_end|>").is_some()
        {
            Template::ChatMl
        } else {
            Template::Plain
        }
    }
}

/// What to do with an example longer than the sequence length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverLength {
    /// Cut the context until it fits; drop when the rest alone is too long.
    #[default]
    Truncate,
    /// Cut the context, then the end of the target (for language-model-style training on
    /// changes too large for the sequence; the cut target is no longer a complete edit).
    TruncateTarget,
    Drop,
}

/// Fewest target tokens an example cut by [`OverLength::TruncateTarget`] keeps.
pub const MIN_TARGET_TOKENS: usize = 16;

/// One tokenized example: `labels[i]` is `ids[i]` on target tokens, −100 elsewhere.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Example {
    /// Tokens the loss is taken on.
    pub fn target_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l >= 0).count()
    }
}

/// What encoding a set of pairs did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct EncodeStats {
    pub pairs: usize,
    pub kept: usize,
    pub truncated: usize,
    pub dropped_too_long: usize,
    pub tokens: usize,
    pub target_tokens: usize,
}

fn system_prompt(format: &str) -> &'static str {
    if format == "udiff" {
        "You are a coding assistant working in this repository. Reply with the change as a unified diff."
    } else {
        "You are a coding assistant working in this repository. Reply with the change as SEARCH/REPLACE blocks."
    }
}

/// The three prompt parts (head, context, tail) and the target of `pair`.
pub fn render(pair: &PairText, template: Template) -> [String; 4] {
    match template {
        Template::ChatMl => [
            format!(
                "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n{}\n\n",
                system_prompt(&pair.format),
                pair.instruction
            ),
            pair.context.clone(),
            "<|im_end|>\n<|im_start|>assistant\n".to_string(),
            format!("{}<|im_end|>\n", pair.target),
        ],
        Template::Plain => [
            format!("{}\n\n", pair.instruction),
            pair.context.clone(),
            "\n\n### Edit\n".to_string(),
            format!("{}<|endoftext|>", pair.target),
        ],
    }
}

fn ids(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, DataError> {
    Ok(tokenizer
        .encode(text, false)
        .map_err(|e| DataError::Encode(e.to_string()))?
        .get_ids()
        .to_vec())
}

/// The prompt of `pair` (template head, context, tail) in at most `max_len` tokens, the
/// context cut to fit; `None` when even the template and instruction do not fit.
pub fn prompt_ids(
    pair: &PairText,
    tokenizer: &Tokenizer,
    template: Template,
    max_len: usize,
) -> Result<Option<Vec<u32>>, DataError> {
    let [head, context, tail, _] = render(pair, template);
    let (head, mut context, tail) = (
        ids(tokenizer, &head)?,
        ids(tokenizer, &context)?,
        ids(tokenizer, &tail)?,
    );
    if head.len() + tail.len() > max_len {
        return Ok(None);
    }
    context.truncate(max_len - head.len() - tail.len());
    Ok(Some([head, context, tail].concat()))
}

/// Encodes `pairs` for sequences of `seq_len` tokens.
pub fn encode_pairs(
    pairs: &[PairText],
    tokenizer: &Tokenizer,
    template: Template,
    seq_len: usize,
    policy: OverLength,
) -> Result<(Vec<Example>, EncodeStats), DataError> {
    let mut stats = EncodeStats {
        pairs: pairs.len(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let [head, context, tail, target] = render(pair, template);
        let (head, mut context, tail, mut target) = (
            ids(tokenizer, &head)?,
            ids(tokenizer, &context)?,
            ids(tokenizer, &tail)?,
            ids(tokenizer, &target)?,
        );
        let fixed = head.len() + tail.len() + target.len();
        if fixed + context.len() > seq_len {
            let frame = head.len() + tail.len();
            match policy {
                OverLength::Truncate if fixed <= seq_len => context.truncate(seq_len - fixed),
                // At least a few target tokens must remain to learn from.
                OverLength::TruncateTarget if frame + MIN_TARGET_TOKENS <= seq_len => {
                    if fixed <= seq_len {
                        context.truncate(seq_len - fixed);
                    } else {
                        context.clear();
                        target.truncate(seq_len - frame);
                    }
                }
                _ => {
                    stats.dropped_too_long += 1;
                    continue;
                }
            }
            stats.truncated += 1;
        }
        let prompt_len = head.len() + context.len() + tail.len();
        let mut all = head;
        all.extend(context);
        all.extend(tail);
        all.extend(&target);
        let labels = (0..all.len())
            .map(|i| if i < prompt_len { -100 } else { all[i] as i64 })
            .collect();
        let example = Example { ids: all, labels };
        stats.kept += 1;
        stats.tokens += example.ids.len();
        stats.target_tokens += example.target_tokens();
        out.push(example);
    }
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::train_byte_level_bpe;

    fn pair(context: &str) -> PairText {
        PairText {
            id: "commit:abc".into(),
            instruction: "Fix the off-by-one in parse".into(),
            context: context.into(),
            target: "src/lib.rs\n<<<<<<< SEARCH\n    n - 1\n=======\n    n\n>>>>>>> REPLACE\n"
                .into(),
            format: "search-replace".into(),
            meta: PairMeta::default(),
        }
    }

    fn tokenizer(dir: &Path) -> Tokenizer {
        let texts: Vec<String> = (0..50)
            .map(|i| format!("fn parse_{i}(n: usize) -> usize {{ n - 1 }}\n"))
            .collect();
        train_byte_level_bpe(texts.iter(), 300, &dir.join("t.json")).unwrap()
    }

    #[test]
    fn labels_cover_exactly_the_target_and_decode_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tokenizer(dir.path());
        assert_eq!(Template::for_tokenizer(&tok), Template::ChatMl);
        let p = pair("### src/lib.rs\nfn parse(n: usize) -> usize {\n    n - 1\n}\n");
        let (ex, stats) = encode_pairs(
            std::slice::from_ref(&p),
            &tok,
            Template::ChatMl,
            4096,
            OverLength::Truncate,
        )
        .unwrap();
        assert_eq!(stats.kept, 1);
        let e = &ex[0];
        let first_target = e.labels.iter().position(|&l| l >= 0).unwrap();
        assert!(e.labels[first_target..].iter().all(|&l| l >= 0));
        let target: Vec<u32> = e.labels[first_target..].iter().map(|&l| l as u32).collect();
        assert_eq!(
            tok.decode(&target, false).unwrap(),
            format!("{}<|im_end|>\n", p.target)
        );
        let prompt = tok.decode(&e.ids[..first_target], false).unwrap();
        assert!(
            prompt.starts_with("<|im_start|>system\n")
                && prompt.ends_with("<|im_start|>assistant\n"),
            "{prompt}"
        );
        assert!(prompt.contains(&p.instruction) && prompt.contains(&p.context));
    }

    #[test]
    fn over_long_examples_are_truncated_in_the_context_or_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tokenizer(dir.path());
        let long = "fn parse(n: usize) -> usize { n - 1 }\n".repeat(40);
        let pairs = [pair("short"), pair(&long)];
        let (ex, _) = encode_pairs(
            &pairs,
            &tok,
            Template::ChatMl,
            1 << 20,
            OverLength::Truncate,
        )
        .unwrap();
        let (short, long_len) = (ex[0].ids.len(), ex[1].ids.len());
        let limit = short + 20;
        assert!(long_len > limit);
        let (ex, stats) =
            encode_pairs(&pairs, &tok, Template::ChatMl, limit, OverLength::Truncate).unwrap();
        assert_eq!(
            (stats.kept, stats.truncated, stats.dropped_too_long),
            (2, 1, 0)
        );
        assert_eq!(ex[1].ids.len(), limit);
        assert_eq!(
            ex[1].target_tokens(),
            ex[0].target_tokens(),
            "the target is never cut"
        );
        let (ex, stats) =
            encode_pairs(&pairs, &tok, Template::ChatMl, limit, OverLength::Drop).unwrap();
        assert_eq!((ex.len(), stats.dropped_too_long), (1, 1));
        // The target's end may go under truncate-target: every example then fills the limit.
        let full_target = ex[0].target_tokens();
        let tight = short - 12; // more than the 5-letter context of the short pair
        let (ex, stats) = encode_pairs(
            &pairs,
            &tok,
            Template::ChatMl,
            tight,
            OverLength::TruncateTarget,
        )
        .unwrap();
        assert_eq!((ex.len(), stats.truncated), (2, 2));
        assert!(ex
            .iter()
            .all(|e| e.ids.len() == tight && e.target_tokens() >= MIN_TARGET_TOKENS));
        assert!(ex.iter().all(|e| e.target_tokens() < full_target));
        // Too short for even the template and target: dropped under both policies.
        let (ex, stats) =
            encode_pairs(&pairs, &tok, Template::ChatMl, 20, OverLength::Truncate).unwrap();
        assert_eq!((ex.len(), stats.dropped_too_long), (0, 2));
    }

    #[test]
    fn bad_jsonl_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.jsonl");
        std::fs::write(&path, "{\"id\":\"a\",\"instruction\":\"i\",\"context\":\"\",\"target\":\"t\",\"format\":\"udiff\"}\n{oops\n").unwrap();
        let e = read_pairs(&path).unwrap_err().to_string();
        assert!(e.contains("train.jsonl:2"), "{e}");
    }
}
